//! A real `perfbox serve` for tests and benchmarks: the built binary, run as the unprivileged
//! perfbox user with a fresh state dir on a free loopback port, driven with curl.

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use serde_json::Value;

use super::{TestDir, user};

pub struct Service {
    binary: PathBuf,
    child: Option<Child>,
    /// Loopback port.
    pub port: u16,
    /// Its test dir (state/ and service.log inside).
    pub dir: TestDir,
    env: Vec<(String, String)>,
    /// A config file for `perfbox serve --config`, if any.
    config: Option<PathBuf>,
    /// With TLS: the CA (PEM) its certificate is checked against; curl then speaks https.
    ca: Option<PathBuf>,
}

pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

impl Service {
    pub fn start(tag: &str, env: &[(&str, &str)]) -> Service {
        Self::start_with(env!("CARGO_BIN_EXE_perfbox").into(), tag, env)
    }

    /// Start one with `config` (TOML) as its config file, then `env` on top.
    pub fn start_config(tag: &str, config: &str, env: &[(&str, &str)]) -> Service {
        Self::start_inner(env!("CARGO_BIN_EXE_perfbox").into(), tag, env, Some(config))
    }

    /// Start a given perfbox binary (benchmarks use the release build).
    pub fn start_with(binary: PathBuf, tag: &str, env: &[(&str, &str)]) -> Service {
        Self::start_inner(binary, tag, env, None)
    }

    /// Start one serving TLS (`env` names its certificate), checked against `ca`.
    pub fn start_tls(tag: &str, env: &[(&str, &str)], ca: PathBuf) -> Service {
        Self::start_full(
            env!("CARGO_BIN_EXE_perfbox").into(),
            tag,
            env,
            None,
            Some(ca),
        )
    }

    fn start_inner(
        binary: PathBuf,
        tag: &str,
        env: &[(&str, &str)],
        config: Option<&str>,
    ) -> Service {
        Self::start_full(binary, tag, env, config, None)
    }

    fn start_full(
        binary: PathBuf,
        tag: &str,
        env: &[(&str, &str)],
        config: Option<&str>,
        ca: Option<PathBuf>,
    ) -> Service {
        let dir = TestDir::new(tag);
        let config = config.map(|text| {
            let path = dir.path().join("config.toml");
            std::fs::write(&path, text).unwrap();
            path
        });
        let st = Command::new("chown")
            .args(["-R", user()])
            .arg(dir.path())
            .status()
            .unwrap();
        assert!(st.success());
        let mut s = Service {
            binary: reachable_copy(&binary),
            child: None,
            port: free_port(),
            dir,
            env: env
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            config,
            ca,
        };
        s.spawn();
        s
    }

    pub fn state(&self) -> PathBuf {
        self.dir.path().join("state")
    }

    pub fn spawn(&mut self) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.path().join("service.log"))
            .unwrap();
        let mut cmd = Command::new("setpriv");
        cmd.args(["--reuid", user(), "--regid", user(), "--init-groups", "--"])
            .arg(&self.binary)
            .args([
                "serve",
                "--bind",
                &format!("127.0.0.1:{}", self.port),
                "--state-dir",
            ])
            .arg(self.state())
            .args(
                self.config
                    .iter()
                    .flat_map(|c| [std::ffi::OsStr::new("--config"), c.as_os_str()]),
            )
            .env_clear()
            .env("PATH", "/usr/local/bin:/usr/bin:/bin:/usr/sbin:/sbin")
            .env("RUST_LOG", "perfbox=debug")
            .env("PERFBOX_RUN_TIMEOUT_SECS", "8")
            .env("PERFBOX_MEMORY_BYTES", "134217728")
            // The suites drive each service from one client, faster and wider than one owner's
            // default quotas allow; the quotas have trials of their own (tests/exposure.rs).
            .env("PERFBOX_SUBMISSIONS_PER_MINUTE", "100000")
            .env("PERFBOX_QUEUED_PER_OWNER", "100000")
            .env("PERFBOX_RUNS_PER_OWNER", "1000")
            // The setup under test (its daemon, cgroups and BuildKit root), as scripts/services
            // passes them to the service it runs.
            .env(
                "PERFBOX_BUILDKIT_ADDR",
                format!("unix://{}", super::buildkit_socket()),
            )
            .env("PERFBOX_CGROUP_PARENT", super::cgroup_parent())
            .env(
                "PERFBOX_BUILD_CGROUP_PARENT",
                format!("{}-build/runs", super::cgroup_parent()),
            )
            .env("PERFBOX_REGISTRIES", super::registry())
            .env(
                "PERFBOX_BUILDKIT_ROOT",
                super::state().join("buildkit/root"),
            )
            .envs(self.env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log);
        let child = cmd.spawn().unwrap();
        SPAWNED
            .lock()
            .unwrap()
            .push((child.id(), self.dir.path().to_path_buf()));
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Ok((200, _)) = self.try_curl(&["/healthz"]) {
                return;
            }
            if Instant::now() > deadline {
                panic!("perfbox did not become healthy:\n{}", self.log());
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("service.log")).unwrap_or_default()
    }

    /// The perfbox process (setpriv execs it).
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// Check its certificate against `ca` from now on (after a renewal).
    pub fn trust(&mut self, ca: PathBuf) {
        self.ca = Some(ca);
    }

    /// The base URL curl uses.
    pub fn url(&self) -> String {
        let scheme = if self.ca.is_some() { "https" } else { "http" };
        format!("{scheme}://127.0.0.1:{}", self.port)
    }

    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            // setpriv execs perfbox, so this pid is perfbox itself.
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(c.id() as i32),
                nix::sys::signal::Signal::SIGKILL,
            );
            let _ = c.wait();
        }
    }

    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(c.id() as i32),
                nix::sys::signal::Signal::SIGTERM,
            );
            let deadline = Instant::now() + Duration::from_secs(10);
            while Instant::now() < deadline {
                if let Ok(Some(_)) = c.try_wait() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(50));
            }
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// curl ARGS... with the path as the last argument; returns (status, body).
    pub fn try_curl(&self, args: &[&str]) -> Result<(u16, String), String> {
        let (path, rest) = args.split_last().unwrap();
        let out = Command::new("curl")
            .args(["-sS", "-m", "30", "-w", "\n%{http_code}"])
            .args(
                self.ca
                    .iter()
                    .flat_map(|ca| [std::ffi::OsStr::new("--cacert"), ca.as_os_str()]),
            )
            .args(rest)
            .arg(format!("{}{path}", self.url()))
            .output()
            .map_err(|e| e.to_string())?;
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        let (body, code) = text.rsplit_once('\n').ok_or("no status")?;
        let code: u16 = code
            .trim()
            .parse()
            .map_err(|_| format!("curl failed: {}", String::from_utf8_lossy(&out.stderr)))?;
        if code == 0 {
            return Err(String::from_utf8_lossy(&out.stderr).into_owned());
        }
        Ok((code, body.to_string()))
    }

    pub fn curl(&self, args: &[&str]) -> (u16, Value) {
        let (code, body) = self
            .try_curl(args)
            .unwrap_or_else(|e| panic!("curl {args:?}: {e}"));
        let v = serde_json::from_str(&body).unwrap_or(Value::String(body));
        (code, v)
    }

    /// `curl -X POST ARGS... <url>/job/build`: (status, body as JSON or else as a string,
    /// response headers lowercased).
    pub fn post(&self, args: &[&str]) -> (u16, Value, String) {
        let out = Command::new("curl")
            .args(["-sS", "-m", "30", "-D", "-", "-X", "POST"])
            .args(
                self.ca
                    .iter()
                    .flat_map(|ca| [std::ffi::OsStr::new("--cacert"), ca.as_os_str()]),
            )
            .args(args)
            .arg(format!("{}/job/build", self.url()))
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        let (mut head, mut body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
        // Interim answers (`100 Continue` to a large upload's `Expect`) come first: skip them.
        while head.starts_with("HTTP/1.1 1") {
            (head, body) = body.split_once("\r\n\r\n").unwrap_or((body, ""));
        }
        let code = head
            .split_whitespace()
            .nth(1)
            .and_then(|c| c.parse().ok())
            .unwrap_or(0);
        (
            code,
            serde_json::from_str(body).unwrap_or(Value::String(body.into())),
            head.to_lowercase(),
        )
    }

    /// [`Self::post`] of `dockerfile` as the `file` field, after `extra` curl arguments.
    pub fn post_dockerfile(&self, dockerfile: &str, extra: &[&str]) -> (u16, Value, String) {
        let path = self
            .dir
            .path()
            .join(format!("job-{}.Dockerfile", uuid::Uuid::new_v4().simple()));
        std::fs::write(&path, dockerfile).unwrap();
        let file = format!("file=@{}", path.display());
        let args: Vec<&str> = extra.iter().copied().chain(["-F", &file]).collect();
        self.post(&args)
    }

    /// POST a Dockerfile the way existing clients do: `curl -X POST -F file=@job.Dockerfile`.
    pub fn submit(&self, dockerfile: &str) -> i64 {
        let (code, v, _) = self.post_dockerfile(dockerfile, &[]);
        assert_eq!(code, 202, "{v}");
        assert!(
            v["filename"].as_str().unwrap().ends_with(".Dockerfile"),
            "{v}"
        );
        v["id"].as_i64().unwrap()
    }

    /// Poll /job/performance/<id> until the job ends.
    pub fn wait(&self, id: i64) -> Value {
        self.wait_with(id, None, Duration::from_secs(180))
    }

    /// [`Self::wait`] with a bearer token (when tokens are on) and a time limit.
    pub fn wait_with(&self, id: i64, token: Option<&str>, within: Duration) -> Value {
        let deadline = Instant::now() + within;
        let auth = token.map(|t| format!("Authorization: Bearer {t}"));
        let path = format!("/job/performance/{id}");
        let mut args: Vec<&str> = auth.iter().flat_map(|a| ["-H", a.as_str()]).collect();
        args.push(&path);
        loop {
            let (code, v) = self.curl(&args);
            assert_eq!(code, 200, "{v}");
            if !matches!(
                v["status"].as_str(),
                Some("queued" | "building" | "running")
            ) {
                return v;
            }
            assert!(
                Instant::now() < deadline,
                "job {id} did not finish: {v}\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    pub fn wait_status(&self, id: i64, want: &str) {
        let deadline = Instant::now() + Duration::from_secs(120);
        while Instant::now() < deadline {
            let (_, v) = self.curl(&[&format!("/job/performance/{id}")]);
            if v["status"] == want {
                return;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        panic!("job {id} never became {want}");
    }

    pub fn total_jobs(&self) -> i64 {
        self.curl(&["/jobs"]).1["total"].as_i64().unwrap()
    }
}

impl Drop for Service {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Every service started, so main can stop the shared one (statics are never dropped).
pub static SPAWNED: Mutex<Vec<(u32, PathBuf)>> = Mutex::new(Vec::new());

/// The binary as the perfbox user can execute it: the checkout may sit under a directory that
/// user cannot enter (e.g. /root), so it runs from a copy under perfbox's state dir (one copy
/// per test process, removed by [`stop_all`]).
pub fn reachable_copy(binary: &std::path::Path) -> PathBuf {
    static COPIES: Mutex<Vec<(PathBuf, PathBuf)>> = Mutex::new(Vec::new());
    let mut copies = COPIES.lock().unwrap();
    if let Some((_, copy)) = copies.iter().find(|(b, _)| b == binary) {
        return copy.clone();
    }
    let dir =
        super::state()
            .join("test")
            .join(format!("bin-{}-{}", std::process::id(), copies.len()));
    std::fs::create_dir_all(&dir).unwrap();
    let copy = dir.join("perfbox");
    std::fs::copy(binary, &copy).unwrap();
    Command::new("chmod")
        .args(["0755"])
        .arg(&dir)
        .arg(&copy)
        .status()
        .unwrap();
    copies.push((binary.to_path_buf(), copy.clone()));
    BIN_DIRS.lock().unwrap().push(dir);
    copy
}

static BIN_DIRS: Mutex<Vec<PathBuf>> = Mutex::new(Vec::new());

pub fn stop_all() {
    for (pid, dir) in SPAWNED.lock().unwrap().drain(..) {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(pid as i32),
            nix::sys::signal::Signal::SIGTERM,
        );
        std::thread::sleep(Duration::from_millis(200));
        if std::env::var_os("PERFBOX_KEEP_TEST_DIRS").is_none() {
            let _ = std::fs::remove_dir_all(dir);
        }
    }
    for dir in BIN_DIRS.lock().unwrap().drain(..) {
        let _ = std::fs::remove_dir_all(dir);
    }
}
