//! `moby.filesync.v1.FileSync/DiffCopy` on the session tunnel: how the daemon reads a build's
//! context (the frontend's `llb.Local("context")`), speaking fsutil's send protocol:
//!
//! 1. we send one `STAT` packet per entry of the directory, depth first, names in byte order
//!    within each directory (the order the daemon's validator requires), then an empty `STAT`;
//! 2. the daemon asks for file contents with `REQ <id>` (the index of the file's `STAT`); we
//!    answer with `DATA <id>` chunks and an empty `DATA <id>`;
//! 3. the daemon sends `FIN`, we answer `FIN`, and the call ends.
//!
//! Only the one directory given is served, under the one name `context`, and only the entries
//! the walk listed: a request for any other name or id is refused. The walk follows no symbolic
//! link (links are sent as links), and only regular files, directories and links exist in it
//! (the context was unpacked by [`crate::jobs::context`]).

use std::path::{Path, PathBuf};
use std::pin::Pin;

use futures::Stream;
use tokio::io::AsyncReadExt;
use tonic::{Request, Response, Status, Streaming};

use crate::buildkit::proto::filesync::FileSync;
use crate::buildkit::proto::fsutil::{Packet, PacketType, Stat};

/// The local name the Dockerfile frontend reads the context from.
pub(crate) const CONTEXT_NAME: &str = "context";

/// Go's `os.FileMode` bits, which fsutil puts in `Stat.mode`.
const GO_MODE_DIR: u32 = 1 << 31;
const GO_MODE_SYMLINK: u32 = 1 << 27;

/// Bytes per DATA packet (fsutil's own buffer size).
const CHUNK: usize = 32 << 10;

/// Serves one directory as the build's context.
#[derive(Debug)]
pub(crate) struct FileSyncService {
    root: PathBuf,
}

impl FileSyncService {
    pub(crate) fn new(root: PathBuf) -> Self {
        Self { root }
    }
}

/// One entry of the walk: its Stat, and its host path when it is a regular file.
struct Entry {
    stat: Stat,
    file: Option<PathBuf>,
}

/// The directory's entries in the order fsutil's receiver validates: depth first, names in
/// byte order within each directory. Include patterns (exact paths or their parent directories,
/// as the Dockerfile frontend asks for `.dockerignore`) narrow it when given.
fn walk(root: &Path, includes: &[String]) -> std::io::Result<Vec<Entry>> {
    fn visit(
        root: &Path,
        rel: &Path,
        includes: &[String],
        out: &mut Vec<Entry>,
    ) -> std::io::Result<()> {
        let mut names: Vec<_> = std::fs::read_dir(root.join(rel))?
            .map(|e| e.map(|e| e.file_name()))
            .collect::<Result<_, _>>()?;
        names.sort_by(|a, b| a.as_encoded_bytes().cmp(b.as_encoded_bytes()));
        for name in names {
            let rel = rel.join(&name);
            let path = root.join(&rel);
            let text = rel.to_string_lossy().into_owned();
            let wanted = includes.is_empty()
                || includes.iter().any(|i| {
                    let i = i.trim_start_matches("./").trim_end_matches('/');
                    i == text
                        || i.starts_with(&format!("{text}/"))
                        || text.starts_with(&format!("{i}/"))
                });
            if !wanted {
                continue;
            }
            let meta = std::fs::symlink_metadata(&path)?;
            let ft = meta.file_type();
            use std::os::unix::fs::MetadataExt;
            let perm = meta.mode() & 0o777;
            let mut stat = Stat {
                path: text,
                mode: perm,
                mod_time: meta.mtime() * 1_000_000_000 + meta.mtime_nsec(),
                ..Default::default()
            };
            let mut file = None;
            if ft.is_dir() {
                stat.mode |= GO_MODE_DIR;
            } else if ft.is_symlink() {
                stat.mode = GO_MODE_SYMLINK | 0o777;
                stat.linkname = std::fs::read_link(&path)?.to_string_lossy().into_owned();
            } else if ft.is_file() {
                stat.size = meta.len() as i64;
                file = Some(path.clone());
            } else {
                // Unpacking makes nothing else; skip rather than send what fsutil cannot take.
                continue;
            }
            out.push(Entry { stat, file });
            if ft.is_dir() {
                visit(root, &rel, includes, out)?;
            }
        }
        Ok(())
    }
    let mut out = vec![];
    visit(root, Path::new(""), includes, &mut out)?;
    Ok(out)
}

fn packet(kind: PacketType, id: u32) -> Packet {
    Packet {
        r#type: kind as i32,
        id,
        ..Default::default()
    }
}

#[tonic::async_trait]
impl FileSync for FileSyncService {
    type DiffCopyStream = Pin<Box<dyn Stream<Item = Result<Packet, Status>> + Send>>;
    type TarStreamStream = Pin<Box<dyn Stream<Item = Result<Packet, Status>> + Send>>;

    async fn diff_copy(
        &self,
        request: Request<Streaming<Packet>>,
    ) -> Result<Response<Self::DiffCopyStream>, Status> {
        let md = request.metadata();
        let name = md
            .get("dir-name")
            .and_then(|v| v.to_str().ok())
            .unwrap_or("");
        if name != CONTEXT_NAME {
            return Err(Status::not_found(format!(
                "this session serves only the local source {CONTEXT_NAME:?}, not {name:?}"
            )));
        }
        let includes: Vec<String> = md
            .get_all("include-patterns")
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(',').map(str::to_owned).collect::<Vec<_>>())
            .filter(|p| !p.is_empty())
            .collect();
        let root = self.root.clone();
        let entries = tokio::task::spawn_blocking(move || walk(&root, &includes))
            .await
            .map_err(|e| Status::internal(e.to_string()))?
            .map_err(|e| Status::internal(format!("cannot list the context: {e}")))?;
        let mut incoming = request.into_inner();
        let (tx, rx) = tokio::sync::mpsc::channel::<Result<Packet, Status>>(64);
        tokio::spawn(async move {
            let mut files: Vec<Option<PathBuf>> = Vec::with_capacity(entries.len());
            for (i, e) in entries.into_iter().enumerate() {
                files.push(e.file);
                let mut p = packet(PacketType::PacketStat, i as u32);
                p.stat = Some(e.stat);
                if tx.send(Ok(p)).await.is_err() {
                    return;
                }
            }
            if tx
                .send(Ok(packet(PacketType::PacketStat, 0)))
                .await
                .is_err()
            {
                return;
            }
            loop {
                let p = match incoming.message().await {
                    Ok(Some(p)) => p,
                    Ok(None) | Err(_) => return,
                };
                match PacketType::try_from(p.r#type) {
                    Ok(PacketType::PacketReq) => {
                        // Each file once, and only those the walk listed.
                        let Some(path) = files.get_mut(p.id as usize).and_then(Option::take) else {
                            let _ = tx
                                .send(Err(Status::invalid_argument(format!(
                                    "invalid file id {}",
                                    p.id
                                ))))
                                .await;
                            return;
                        };
                        if let Err(e) = send_file(&tx, p.id, &path).await {
                            let _ = tx.send(Err(Status::internal(e))).await;
                            return;
                        }
                    }
                    Ok(PacketType::PacketFin) => {
                        let _ = tx.send(Ok(packet(PacketType::PacketFin, 0))).await;
                        return;
                    }
                    Ok(PacketType::PacketErr) => {
                        tracing::debug!(
                            "the daemon gave up reading the context: {}",
                            String::from_utf8_lossy(&p.data)
                        );
                        return;
                    }
                    _ => {}
                }
            }
        });
        Ok(Response::new(Box::pin(
            tokio_stream::wrappers::ReceiverStream::new(rx),
        )))
    }

    async fn tar_stream(
        &self,
        _request: Request<Streaming<Packet>>,
    ) -> Result<Response<Self::TarStreamStream>, Status> {
        Err(Status::unimplemented("only DiffCopy is served"))
    }
}

/// A file's DATA packets, then the empty one that ends it.
async fn send_file(
    tx: &tokio::sync::mpsc::Sender<Result<Packet, Status>>,
    id: u32,
    path: &Path,
) -> Result<(), String> {
    let mut f = tokio::fs::File::open(path)
        .await
        .map_err(|e| format!("cannot open {}: {e}", path.display()))?;
    let mut buf = vec![0u8; CHUNK];
    loop {
        let n = f
            .read(&mut buf)
            .await
            .map_err(|e| format!("cannot read {}: {e}", path.display()))?;
        let mut p = packet(PacketType::PacketData, id);
        if n > 0 {
            p.data = buf[..n].to_vec();
        }
        tx.send(Ok(p))
            .await
            .map_err(|_| "the session ended".to_string())?;
        if n == 0 {
            return Ok(());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_walk_is_depth_first_in_byte_order_and_follows_no_link() {
        let t = tempfile::tempdir().unwrap();
        let r = t.path();
        std::fs::create_dir_all(r.join("a/b")).unwrap();
        std::fs::write(r.join("a/b/c"), "1").unwrap();
        std::fs::write(r.join("a.txt"), "22").unwrap();
        std::fs::write(r.join("B"), "").unwrap();
        std::os::unix::fs::symlink("/etc", r.join("z")).unwrap();
        let e = walk(r, &[]).unwrap();
        let paths: Vec<&str> = e.iter().map(|e| e.stat.path.as_str()).collect();
        assert_eq!(paths, ["B", "a", "a/b", "a/b/c", "a.txt", "z"]);
        assert_eq!(e[1].stat.mode & GO_MODE_DIR, GO_MODE_DIR);
        assert_eq!((e[4].stat.size, e[4].file.is_some()), (2, true));
        assert_eq!(e[5].stat.mode & GO_MODE_SYMLINK, GO_MODE_SYMLINK);
        assert_eq!(e[5].stat.linkname, "/etc");
        assert!(e[5].file.is_none(), "a link's target is never read");
        let only: Vec<String> = walk(r, &[".dockerignore".into(), "a/b".into()])
            .unwrap()
            .into_iter()
            .map(|e| e.stat.path)
            .collect();
        assert_eq!(only, ["a", "a/b", "a/b/c"]);
    }
}
