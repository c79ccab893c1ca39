//! The image cache: one read-only root filesystem per image, shared by every job that runs it,
//! so that a job whose image was already built pays neither for the export nor for unpacking.
//!
//! Entries live in `<state>/images/<key>/` (`rootfs/` + `meta.json`). A key names a root
//! filesystem's content: BuildKit's digest of the final build definition where the client
//! reports it, else the hash of the Dockerfile (identical Dockerfiles give identical images here:
//! base images come from a read-only registry and RUN steps have no network). Sharing is safe
//! because the sandbox mounts the rootfs read-only and gives each job its own /data.
//!
//! The cache is bounded in bytes with LRU eviction; an entry in use by a job (a [`Lease`]) is
//! never evicted. Dockerfile aliases (`aliases/<dockerfile sha256>.json`) remember which rootfs
//! and image config an identical Dockerfile produced, so resubmitting it needs no build at all.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use serde::{Deserialize, Serialize};

use crate::image::ImageConfig;

/// What a Dockerfile produced.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Alias {
    /// Rootfs key in the cache.
    pub rootfs_key: String,
    /// The image config the build returned.
    pub config: ImageConfig,
    /// Its digest.
    pub config_digest: Option<String>,
}

#[derive(Debug, Serialize, Deserialize)]
struct Meta {
    bytes: u64,
}

#[derive(Debug)]
struct Entry {
    bytes: u64,
    last_used: u64,
    leases: usize,
}

#[derive(Debug, Default)]
struct State {
    entries: HashMap<String, Entry>,
    total: u64,
    clock: u64,
}

/// The cache (cheap to clone).
#[derive(Debug, Clone)]
pub struct ImageCache {
    dir: PathBuf,
    max_bytes: u64,
    state: Arc<Mutex<State>>,
}

/// A job's use of a cached rootfs; the entry cannot be evicted while a lease exists.
#[derive(Debug)]
pub struct Lease {
    cache: ImageCache,
    key: String,
    rootfs: PathBuf,
}

impl Lease {
    /// The shared, read-only root filesystem.
    pub fn rootfs(&self) -> &Path {
        &self.rootfs
    }

    /// The cache key.
    pub fn key(&self) -> &str {
        &self.key
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        let mut st = self.cache.lock();
        if let Some(e) = st.entries.get_mut(&self.key) {
            e.leases = e.leases.saturating_sub(1);
        }
        drop(st);
        self.cache.evict();
    }
}

/// Rootfs keys are used as directory names: only `[A-Za-z0-9._-]`.
fn valid_key(key: &str) -> bool {
    !key.is_empty()
        && key.len() <= 200
        && !key.starts_with('.')
        && key
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "._-".contains(c))
}

impl ImageCache {
    /// Open (and index) the cache in `dir`, bounded to `max_bytes`.
    pub fn open(dir: &Path, max_bytes: u64) -> std::io::Result<Self> {
        std::fs::create_dir_all(dir.join("aliases"))?;
        let mut st = State::default();
        for e in std::fs::read_dir(dir)?.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            if name == "aliases" || !e.path().is_dir() {
                continue;
            }
            let meta = std::fs::read(e.path().join("meta.json"))
                .ok()
                .and_then(|b| serde_json::from_slice::<Meta>(&b).ok());
            match meta {
                Some(m) if valid_key(&name) => {
                    st.clock += 1;
                    st.total += m.bytes;
                    st.entries.insert(
                        name,
                        Entry {
                            bytes: m.bytes,
                            last_used: st.clock,
                            leases: 0,
                        },
                    );
                }
                // Half-written (perfbox died while inserting): remove.
                _ => {
                    let _ = std::fs::remove_dir_all(e.path());
                }
            }
        }
        let cache = Self {
            dir: dir.to_path_buf(),
            max_bytes,
            state: Arc::new(Mutex::new(st)),
        };
        cache.evict();
        Ok(cache)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A fresh staging directory for a build's export (moved into the cache by [`insert`](Self::insert)).
    pub fn staging_dir(&self) -> PathBuf {
        self.dir
            .join(format!(".staging-{}", uuid::Uuid::new_v4().simple()))
    }

    /// Lease the rootfs stored under `key`, if present.
    pub fn lease(&self, key: &str) -> Option<Lease> {
        let mut st = self.lock();
        st.clock += 1;
        let clock = st.clock;
        let e = st.entries.get_mut(key)?;
        e.leases += 1;
        e.last_used = clock;
        Some(Lease {
            cache: self.clone(),
            key: key.to_string(),
            rootfs: self.dir.join(key).join("rootfs"),
        })
    }

    /// Move an exported rootfs (`staging`, a dir from [`staging_dir`](Self::staging_dir)) into
    /// the cache under `key` and lease it. If another job inserted the same key meanwhile, the
    /// staging copy is discarded and the existing entry is leased.
    pub fn insert(&self, key: &str, staging: &Path, bytes: u64) -> std::io::Result<Lease> {
        if !valid_key(key) {
            return Err(std::io::Error::other(format!(
                "invalid image cache key {key:?}"
            )));
        }
        if let Some(l) = self.lease(key) {
            let _ = std::fs::remove_dir_all(staging);
            return Ok(l);
        }
        // Mount points the runtime would otherwise create inside the shared tree at run time.
        for d in ["proc", "sys", "dev", "tmp", "data", "input"] {
            let p = staging.join(d);
            if std::fs::symlink_metadata(&p).is_err() {
                let _ = std::fs::create_dir(&p);
            }
        }
        let entry = self.dir.join(key);
        let tmp = self
            .dir
            .join(format!(".insert-{}", uuid::Uuid::new_v4().simple()));
        std::fs::create_dir(&tmp)?;
        std::fs::rename(staging, tmp.join("rootfs"))?;
        std::fs::write(
            tmp.join("meta.json"),
            serde_json::to_vec(&Meta { bytes }).map_err(std::io::Error::other)?,
        )?;
        {
            let mut st = self.lock();
            if st.entries.contains_key(key) {
                drop(st);
                let _ = std::fs::remove_dir_all(&tmp);
            } else {
                std::fs::rename(&tmp, &entry)?;
                st.clock += 1;
                let clock = st.clock;
                st.total += bytes;
                st.entries.insert(
                    key.to_string(),
                    Entry {
                        bytes,
                        last_used: clock,
                        leases: 0,
                    },
                );
            }
        }
        let lease = self
            .lease(key)
            .ok_or_else(|| std::io::Error::other("image cache entry vanished"))?;
        self.evict();
        Ok(lease)
    }

    /// Remember what a Dockerfile produced.
    pub fn set_alias(&self, dockerfile_sha256: &str, alias: &Alias) {
        if !valid_key(dockerfile_sha256) {
            return;
        }
        let path = self
            .dir
            .join("aliases")
            .join(format!("{dockerfile_sha256}.json"));
        let tmp = path.with_extension(format!("tmp-{}", uuid::Uuid::new_v4().simple()));
        if let Ok(bytes) = serde_json::to_vec(alias)
            && std::fs::write(&tmp, bytes).is_ok()
        {
            let _ = std::fs::rename(&tmp, &path);
        }
    }

    /// What an identical Dockerfile produced before, if its rootfs is still cached (leased).
    pub fn lookup_alias(&self, dockerfile_sha256: &str) -> Option<(Alias, Lease)> {
        if !valid_key(dockerfile_sha256) {
            return None;
        }
        let bytes = std::fs::read(
            self.dir
                .join("aliases")
                .join(format!("{dockerfile_sha256}.json")),
        )
        .ok()?;
        let alias: Alias = serde_json::from_slice(&bytes).ok()?;
        let lease = self.lease(&alias.rootfs_key)?;
        Some((alias, lease))
    }

    /// Bytes cached.
    pub fn total_bytes(&self) -> u64 {
        self.lock().total
    }

    /// Entries cached.
    pub fn len(&self) -> usize {
        self.lock().entries.len()
    }

    /// Whether nothing is cached.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Remove least-recently-used entries that no job holds until the total fits.
    fn evict(&self) {
        loop {
            let victim = {
                let mut st = self.lock();
                if st.total <= self.max_bytes {
                    return;
                }
                let Some(key) = st
                    .entries
                    .iter()
                    .filter(|(_, e)| e.leases == 0)
                    .min_by_key(|(_, e)| e.last_used)
                    .map(|(k, _)| k.clone())
                else {
                    return; // everything left is in use
                };
                let e = st.entries.remove(&key).expect("present");
                st.total -= e.bytes;
                key
            };
            // Rename first (atomic), then delete outside the lock.
            let doomed = self
                .dir
                .join(format!(".evicted-{}", uuid::Uuid::new_v4().simple()));
            if std::fs::rename(self.dir.join(&victim), &doomed).is_ok() {
                let _ = std::fs::remove_dir_all(&doomed);
            }
            tracing::info!(key = %victim, "evicted image from the cache");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn staged(cache: &ImageCache, content: &str) -> PathBuf {
        let s = cache.staging_dir();
        std::fs::create_dir_all(s.join("bin")).unwrap();
        std::fs::write(s.join("bin/file"), content).unwrap();
        s
    }

    #[test]
    fn lru_eviction_spares_leased_entries_and_survives_reopen() {
        let d = tempfile::tempdir().unwrap();
        let cache = ImageCache::open(d.path(), 250).unwrap();
        let a = cache.insert("a", &staged(&cache, "a"), 100).unwrap();
        let b = cache.insert("b", &staged(&cache, "b"), 100).unwrap();
        assert_eq!(
            std::fs::read_to_string(a.rootfs().join("bin/file")).unwrap(),
            "a"
        );
        assert!(
            a.rootfs().join("data").is_dir(),
            "mount points are created at insert"
        );
        drop(b);
        // a is leased, b is not: inserting c (over the bound) evicts b, never a.
        let c = cache.insert("c", &staged(&cache, "c"), 100).unwrap();
        assert!(cache.lease("b").is_none());
        assert!(a.rootfs().exists() && c.rootfs().exists());
        // Everything leased: nothing is evicted even over the bound.
        let d_lease = cache.insert("d", &staged(&cache, "d"), 100).unwrap();
        assert_eq!(cache.len(), 3);
        drop((a, c, d_lease));
        assert!(cache.total_bytes() <= 250);
        // Aliases map Dockerfiles to cached rootfs and configs.
        let alias = Alias {
            rootfs_key: "d".into(),
            config: ImageConfig {
                cmd: Some(vec!["x".into()]),
                ..Default::default()
            },
            config_digest: None,
        };
        cache.set_alias("abc123", &alias);
        let (found, _lease) = cache.lookup_alias("abc123").unwrap();
        assert_eq!(found, alias);
        assert!(cache.lookup_alias("../etc").is_none());
        assert!(cache.insert("../x", &staged(&cache, "x"), 1).is_err());
        drop(_lease);
        let reopened = ImageCache::open(d.path(), 250).unwrap();
        assert_eq!(reopened.len(), cache.len());
    }
}
