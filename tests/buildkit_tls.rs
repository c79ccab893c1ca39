//! perfbox's BuildKit client against a remote-style daemon over TCP + mutual TLS: a second
//! rootless buildkitd (as perfbox, under rootlesskit) listening on 127.0.0.1 with certificates
//! made here by openssl. The client must build through it with the right CA and client
//! identity, and must fail without them.

mod common;

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::*;
use libtest_mimic::{Arguments, Failed, Trial};
use perfbox::buildkit::{BuildError, BuildRequest, BuildkitClient, NullLog, TlsOptions};

fn sh(cmd: &str, dir: &Path) {
    let out = Command::new("sh")
        .arg("-c")
        .arg(cmd)
        .current_dir(dir)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{cmd}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// CA, server certificate for 127.0.0.1, client certificate; all in `dir`.
fn make_certs(dir: &Path) {
    sh(
        "openssl req -x509 -newkey rsa:2048 -nodes -days 1 -subj /CN=perfbox-test-ca -keyout ca.key -out ca.pem 2>/dev/null",
        dir,
    );
    // X.509 v3 (extensions) for both leaf certificates: rustls/webpki refuses v1.
    std::fs::write(
        dir.join("server.ext"),
        "subjectAltName=IP:127.0.0.1,DNS:localhost\nextendedKeyUsage=serverAuth\n",
    )
    .unwrap();
    std::fs::write(dir.join("client.ext"), "extendedKeyUsage=clientAuth\n").unwrap();
    sh(
        "openssl req -newkey rsa:2048 -nodes -subj /CN=127.0.0.1 -keyout server.key -out server.csr 2>/dev/null",
        dir,
    );
    sh(
        "openssl x509 -req -in server.csr -CA ca.pem -CAkey ca.key -CAcreateserial -days 1 -extfile server.ext -out server.pem 2>/dev/null",
        dir,
    );
    sh(
        "openssl req -newkey rsa:2048 -nodes -subj /CN=perfbox-client -keyout client.key -out client.csr 2>/dev/null",
        dir,
    );
    sh(
        "openssl x509 -req -in client.csr -CA ca.pem -CAkey ca.key -CAcreateserial -days 1 -extfile client.ext -out client.pem 2>/dev/null",
        dir,
    );
    // A second CA that signed nothing: a client trusting it must refuse the daemon.
    sh(
        "openssl req -x509 -newkey rsa:2048 -nodes -days 1 -subj /CN=other-ca -keyout other.key -out other.pem 2>/dev/null",
        dir,
    );
}

struct Daemon(Child);

impl Drop for Daemon {
    fn drop(&mut self) {
        // rootlesskit and buildkitd are in their own session: kill the whole group.
        let pgid = nix::unistd::Pid::from_raw(-(self.0.id() as i32));
        let _ = nix::sys::signal::kill(pgid, nix::sys::signal::Signal::SIGKILL);
        let _ = self.0.wait();
    }
}

fn start_daemon(dir: &Path, port: u16) -> Daemon {
    // The main daemon's config (registry mirror), minus its socket and root.
    let main_cfg = std::fs::read_to_string(state().join("buildkit/buildkitd.toml")).unwrap();
    let mut cfg = String::new();
    let mut skip = false;
    for line in main_cfg.lines() {
        let t = line.trim();
        if t.starts_with('[') {
            skip = t == "[grpc]";
        }
        if skip || t.starts_with("root =") || t.starts_with("address =") {
            continue;
        }
        cfg.push_str(line);
        cfg.push('\n');
    }
    // Its own trace socket (the default would be the main daemon's, or /run/buildkit).
    cfg = format!(
        "[otel]\n  socketPath = \"{}/otel-grpc.sock\"\n\n{cfg}",
        dir.display()
    );
    std::fs::write(dir.join("buildkitd.toml"), cfg).unwrap();
    Command::new("chown")
        .args(["-R", user()])
        .arg(dir)
        .status()
        .unwrap();
    let log = std::fs::File::create(dir.join("daemon.log")).unwrap();
    let d = dir.display();
    let u = user();
    let script = format!(
        "exec setpriv --reuid {u} --regid {u} --init-groups -- env XDG_RUNTIME_DIR={d} \
         rootlesskit --net=host --copy-up=/etc --state-dir={d}/rk buildkitd --config {d}/buildkitd.toml --root {d}/root \
         --addr tcp://127.0.0.1:{port} --tlscacert {d}/ca.pem --tlscert {d}/server.pem --tlskey {d}/server.key"
    );
    let mut cmd = Command::new("setsid");
    cmd.args(["sh", "-c", &script])
        .stdin(Stdio::null())
        .stdout(log.try_clone().unwrap())
        .stderr(log);
    let daemon = Daemon(cmd.spawn().unwrap());
    let deadline = Instant::now() + Duration::from_secs(30);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(
            Instant::now() < deadline,
            "TLS buildkitd did not start:\n{}",
            std::fs::read_to_string(dir.join("daemon.log")).unwrap_or_default()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    daemon
}

fn tls_build() -> Result<(), Failed> {
    let dir = TestDir::new("buildkit-tls");
    make_certs(dir.path());
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let _daemon = start_daemon(dir.path(), port);
    let addr = format!("tcp://127.0.0.1:{port}");
    let d = dir.path();
    let good = TlsOptions {
        ca_cert: d.join("ca.pem"),
        cert: Some(d.join("client.pem")),
        key: Some(d.join("client.key")),
        server_name: None,
    };
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let client = BuildkitClient::connect_tls(&addr, &good).await.unwrap();
        let info = client.health().await.expect("health over mutual TLS");
        assert!(info.version.starts_with("v0."), "{info:?}");
        let rootfs = d.join("rootfs");
        let nonce = uuid::Uuid::new_v4().simple().to_string();
        let mut req = BuildRequest::new(
            format!("FROM busybox\nRUN echo {nonce} > /over-tls\nCMD [\"true\"]\n").into_bytes(),
            rootfs.clone(),
        );
        req.source_policy = perfbox::buildkit::SourcePolicy::new(&[registry()]).expect("registry");
        let built = client.build(req, NullLog).await.expect("build over TLS");
        assert_eq!(
            std::fs::read_to_string(rootfs.join("over-tls"))
                .unwrap()
                .trim(),
            nonce
        );
        assert!(built.exported);

        // No client identity: the daemon (started with --tlscacert) refuses the handshake.
        let anonymous = TlsOptions {
            cert: None,
            key: None,
            ..good.clone()
        };
        let err = BuildkitClient::connect_tls(&addr, &anonymous)
            .await
            .unwrap()
            .health()
            .await
            .unwrap_err();
        assert!(
            matches!(
                err,
                BuildError::DaemonUnavailable { .. } | BuildError::Other { .. }
            ),
            "{err:?}"
        );
        // A CA that did not sign the daemon's certificate: the client refuses the daemon.
        let wrong_ca = TlsOptions {
            ca_cert: d.join("other.pem"),
            ..good.clone()
        };
        assert!(
            BuildkitClient::connect_tls(&addr, &wrong_ca)
                .await
                .unwrap()
                .health()
                .await
                .is_err()
        );
        // Plaintext against the TLS port fails too.
        assert!(
            BuildkitClient::connect(&addr)
                .await
                .unwrap()
                .health()
                .await
                .is_err()
        );
        // TLS needs a tcp:// address.
        assert!(matches!(
            BuildkitClient::connect_tls("unix:///x.sock", &good).await,
            Err(BuildError::InvalidRequest { .. })
        ));
    });
    Ok(())
}

fn main() {
    require_setup();
    let args = Arguments::from_args();
    let conclusion = libtest_mimic::run(
        &args,
        vec![Trial::test("build_over_tcp_with_mutual_tls", tls_build)],
    );
    conclusion.exit();
}
