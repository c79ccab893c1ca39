//! The opt-in networked build daemon (`buildkitd-net`, scripts/buildkitd-net): RUN steps get a
//! network (an interface besides `lo` and a default route) but no path to the host's loopback,
//! where perfbox's API and the registry listen; the daemon still pulls base images from that
//! registry, and everything runs as the unprivileged perfbox user.
//!
//! Network rule of these tests: they only ever connect to loopback addresses, or (from inside a
//! RUN step) to addresses of the namespaces rootlesskit made here, to prove them BLOCKED. "Has a
//! network" is shown from the interface and route tables, never by connecting outwards.
//!
//! When setup did not start the daemon, it wrote why to $PERFBOX_STATE/buildkit-net/unavailable:
//! the trials are then reported as ignored with that reason; without a reason they fail.

mod common;

use std::path::PathBuf;
use std::process::Command;
use std::sync::OnceLock;

use common::*;
use libtest_mimic::{Arguments, Failed, Trial};

/// Where setup writes why it did not start the networked daemon.
fn unavailable() -> PathBuf {
    state().join("buildkit-net/unavailable")
}
/// slirp4netns's alias of the host (its loopback, unless --disable-host-loopback).
const SLIRP_HOST: &str = "10.0.2.2";
/// The address of rootlesskit's netns on slirp's network (the daemon netns).
const DAEMON_NETNS_ADDR: &str = "10.0.2.100";

fn nonce() -> String {
    let t = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos();
    format!("{}-{t}", std::process::id())
}

/// What one probing build (FROM busybox, default network mode of the networked daemon) saw.
struct Probe {
    /// The build's log, or why it failed.
    result: Result<String, String>,
    tar: PathBuf,
    /// Whether the host-side listener accepted a connection, checked after the build.
    listener_accepted: bool,
    port: u16,
    _dir: TestDir,
}

impl Probe {
    fn file(&self, name: &str) -> Result<String, Failed> {
        if let Err(log) = &self.result {
            return Err(format!("the build on {} failed:\n{log}", buildkit_net_socket()).into());
        }
        let out = Command::new("tar")
            .arg("-xOf")
            .arg(&self.tar)
            .arg(name)
            .output()
            .unwrap();
        if !out.status.success() {
            return Err(format!(
                "{name} missing from the built image: {}",
                String::from_utf8_lossy(&out.stderr)
            )
            .into());
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }
}

fn probe() -> &'static Probe {
    static PROBE: OnceLock<Probe> = OnceLock::new();
    PROBE.get_or_init(|| {
        // A listener on the host's loopback, as the perfbox API would be.
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        listener.set_nonblocking(true).unwrap();
        let port = listener.local_addr().unwrap().port();
        let rport = registry_port();
        let dir = TestDir::new("net-probe");
        let tar = dir.path().join("probe.tar");
        // Each probe writes "reached" or "blocked"; the nonce defeats the build cache.
        let try_ = |addr: &str, port: u16, file: &str| {
            format!("(nc -w 3 {addr} {port} </dev/null >/dev/null 2>&1 && echo reached || echo blocked) > /probe/{file}")
        };
        let df = format!(
            "FROM busybox\n\
             RUN echo {nonce} && mkdir /probe && cat /proc/net/route > /probe/route && \
             awk 'NR>2 {{ sub(\":\", \"\", $1); print $1 }}' /proc/net/dev > /probe/ifaces && \
             (nc -l -p 7777 </dev/null >/dev/null 2>&1 &) && sleep 1 && {control}; \
             {lo}; {slirp}; {registry}; {slirp_registry}; {daemon_netns}; \
             gw=$(awk 'NR>1 && $2==\"00000000\" {{ g=$3; printf \"%d.%d.%d.%d\", \"0x\" substr(g,7,2), \"0x\" substr(g,5,2), \"0x\" substr(g,3,2), \"0x\" substr(g,1,2) }}' /proc/net/route); \
             echo \"$gw\" > /probe/gateway; \
             (nc -w 3 \"$gw\" {rport} </dev/null >/dev/null 2>&1 && echo reached || echo blocked) > /probe/gateway_registry\n",
            nonce = nonce(),
            control = try_("127.0.0.1", 7777, "control"),
            lo = try_("127.0.0.1", port, "host_lo"),
            slirp = try_(SLIRP_HOST, port, "slirp_host"),
            registry = try_("127.0.0.1", rport, "registry"),
            slirp_registry = try_(SLIRP_HOST, rport, "slirp_registry"),
            daemon_netns = try_(DAEMON_NETNS_ADDR, rport, "daemon_netns_registry"),
        );
        let result = buildctl_build(&buildkit_net_socket(), dir.path(), &df, &tar, &[]);
        let listener_accepted = listener.accept().is_ok();
        Probe { result, tar, listener_accepted, port, _dir: dir }
    })
}

/// (1) The RUN step has an interface besides lo and a default route (read from its own tables).
fn run_step_has_interface_and_default_route() -> Result<(), Failed> {
    let p = probe();
    let ifaces = p.file("probe/ifaces")?;
    let ifaces: Vec<&str> = ifaces.split_whitespace().collect();
    assert!(ifaces.contains(&"lo"), "no lo in the RUN step: {ifaces:?}");
    assert!(
        ifaces.iter().any(|i| *i != "lo"),
        "the RUN step has only {ifaces:?}: no network"
    );
    let route = p.file("probe/route")?;
    let default: Vec<&str> = route
        .lines()
        .skip(1)
        .filter(|l| l.split_whitespace().nth(1) == Some("00000000"))
        .collect();
    assert!(
        !default.is_empty(),
        "no default route in the RUN step:\n{route}"
    );
    let dev = default[0].split_whitespace().next().unwrap();
    assert_ne!(dev, "lo", "the default route goes through lo:\n{route}");
    // Its own netns behind the bridge, not the daemon's netns (whose loopback has the relay).
    assert!(
        !ifaces.contains(&"tap0"),
        "the RUN step shares the daemon's netns (tap0 visible): {ifaces:?}"
    );
    Ok(())
}

/// (2) It cannot connect to the host's loopback: not directly, not through slirp's host alias,
/// not the registry, not the relay through the daemon netns's addresses; nothing was accepted.
fn run_step_cannot_reach_host_loopback() -> Result<(), Failed> {
    let p = probe();
    let rport = registry_port();
    // Control: the same probe does report "reached" for a listener in the RUN step's own netns.
    assert_eq!(
        p.file("probe/control")?.trim(),
        "reached",
        "the probe cannot even reach its own loopback listener"
    );
    for (file, what) in [
        (
            "host_lo",
            format!("127.0.0.1:{} (a listener on the host's loopback)", p.port),
        ),
        (
            "slirp_host",
            format!("{SLIRP_HOST}:{} (slirp's alias of the host)", p.port),
        ),
        ("registry", format!("{} (the registry)", registry())),
        (
            "slirp_registry",
            format!("{SLIRP_HOST}:{rport} (the registry through slirp)"),
        ),
        (
            "daemon_netns_registry",
            format!("{DAEMON_NETNS_ADDR}:{rport} (the daemon netns, where the registry relay is)"),
        ),
        (
            "gateway_registry",
            format!("the default gateway :{rport} (the bridge in the daemon netns)"),
        ),
    ] {
        let got = p.file(&format!("probe/{file}"))?;
        assert_eq!(got.trim(), "blocked", "a RUN step reached {what}");
    }
    assert!(
        !p.listener_accepted,
        "the listener on the host's 127.0.0.1:{} accepted a connection",
        p.port
    );
    Ok(())
}

/// (4) The daemon pulled `busybox` from the registry on the host's loopback and built on it.
fn base_image_pull_works() -> Result<(), Failed> {
    let p = probe();
    let log = p
        .result
        .as_ref()
        .map_err(|l| format!("the build failed:\n{l}"))?;
    assert!(
        log.contains("FROM docker.io/library/busybox"),
        "no busybox pull in the log:\n{log}"
    );
    let list = Command::new("tar").arg("-tf").arg(&p.tar).output().unwrap();
    let list = String::from_utf8_lossy(&list.stdout);
    assert!(
        list.lines().any(|l| l == "bin/busybox"),
        "the image has no bin/busybox"
    );
    Ok(())
}

/// `RUN --network=host` would put the step in the daemon's netns: the daemon grants no
/// entitlement, so the build must be refused.
fn host_network_entitlement_is_refused() -> Result<(), Failed> {
    let dir = TestDir::new("net-host");
    let tar = dir.path().join("host.tar");
    let df = format!("FROM busybox\nRUN --network=host echo {}\n", nonce());
    match buildctl_build(
        &buildkit_net_socket(),
        dir.path(),
        &df,
        &tar,
        &["--allow", "network.host"],
    ) {
        Ok(log) => Err(format!("RUN --network=host was allowed:\n{log}").into()),
        Err(log) if log.contains("network.host is not allowed") => Ok(()),
        Err(log) => Err(format!("refused, but not for the entitlement:\n{log}").into()),
    }
}

fn status_uids(pid: u32) -> Option<Vec<u32>> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|l| l.starts_with("Uid:"))?;
    Some(
        line.split_whitespace()
            .skip(1)
            .filter_map(|u| u.parse().ok())
            .collect(),
    )
}

fn comm(pid: u32) -> String {
    std::fs::read_to_string(format!("/proc/{pid}/comm"))
        .unwrap_or_default()
        .trim()
        .to_string()
}

fn cmdline(pid: u32) -> String {
    let raw = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
    String::from_utf8_lossy(&raw).replace('\0', " ")
}

fn ppid(pid: u32) -> Option<u32> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    stat.rsplit(')')
        .next()?
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()
}

/// (3) buildkitd, rootlesskit, slirp4netns and the relays of the networked daemon run as perfbox.
fn networked_daemon_runs_as_perfbox() -> Result<(), Failed> {
    let perfbox = nix::unistd::User::from_name(user())
        .unwrap()
        .unwrap()
        .uid
        .as_raw();
    // Everything whose command line names the daemon's state dir, config or relay socket (the
    // clients this test binary runs, buildctl as root, aside)...
    // (Only this setup's: its run or state dir is in each command line.)
    let mine = |p: u32| {
        let c = cmdline(p);
        c.contains(&run_dir().display().to_string()) || c.contains(&state().display().to_string())
    };
    let mut pids: Vec<u32> = processes_with("buildkit-net")
        .into_iter()
        .filter(|p| comm(*p) != "buildctl" && mine(*p))
        .collect();
    // ...and slirp4netns, whose command line does not: it is a child of that rootlesskit.
    let slirps: Vec<u32> = std::fs::read_dir("/proc")
        .unwrap()
        .flatten()
        .filter_map(|e| e.file_name().to_string_lossy().parse::<u32>().ok())
        .filter(|p| comm(*p) == "slirp4netns" && ppid(*p).is_some_and(|pp| pids.contains(&pp)))
        .collect();
    pids.extend(&slirps);
    let comms: Vec<String> = pids.iter().map(|p| comm(*p)).collect();
    for want in ["buildkitd", "rootlesskit", "slirp4netns", "socat"] {
        assert!(
            comms.iter().any(|c| c == want),
            "no {want} of buildkitd-net running (found {comms:?})"
        );
    }
    for pid in &pids {
        let Some(uids) = status_uids(*pid) else {
            continue;
        }; // exited meanwhile
        assert!(
            uids.iter().all(|u| *u == perfbox),
            "{} (pid {pid}) of buildkitd-net runs with uids {uids:?}, not {} ({perfbox})",
            comm(*pid),
            user()
        );
    }
    for slirp in &slirps {
        let cmd = std::fs::read(format!("/proc/{slirp}/cmdline")).unwrap_or_default();
        let cmd = String::from_utf8_lossy(&cmd).replace('\0', " ");
        assert!(
            cmd.contains("--disable-host-loopback"),
            "slirp4netns runs without --disable-host-loopback: {cmd}"
        );
    }
    Ok(())
}

fn daemon_answers() -> Result<(), String> {
    let out = Command::new("buildctl")
        .args([
            "--addr",
            &format!("unix://{}", buildkit_net_socket()),
            "debug",
            "workers",
        ])
        .output()
        .map_err(|e| format!("buildctl: {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(first_error_line(&String::from_utf8_lossy(&out.stderr)))
    }
}

/// One check of this file.
type Check = fn() -> Result<(), Failed>;

fn main() {
    require_setup();
    let args = Arguments::from_args();
    let tests: [(&str, Check); 5] = [
        (
            "run_step_has_interface_and_default_route",
            run_step_has_interface_and_default_route,
        ),
        (
            "run_step_cannot_reach_host_loopback",
            run_step_cannot_reach_host_loopback,
        ),
        (
            "networked_daemon_runs_as_perfbox",
            networked_daemon_runs_as_perfbox,
        ),
        ("base_image_pull_works", base_image_pull_works),
        (
            "host_network_entitlement_is_refused",
            host_network_entitlement_is_refused,
        ),
    ];
    let trials: Vec<Trial> = match (daemon_answers(), std::fs::read_to_string(unavailable())) {
        (Ok(()), _) => tests.into_iter().map(|(n, f)| Trial::test(n, f)).collect(),
        // Setup decided this host cannot run it safely, and said why: ignored, with that reason.
        (Err(_), Ok(reason)) => {
            let reason: String = reason.trim().chars().filter(|c| *c != '[' && *c != ']').take(200).collect();
            tests.into_iter().map(|(n, _)| skipped(n, &format!("buildkitd-net not started by setup: {reason}"))).collect()
        }
        (Err(e), Err(_)) => tests
            .into_iter()
            .map(|(n, _)| {
                let e = e.clone();
                Trial::test(n, move || Err(format!("buildkitd-net does not answer on {} ({e}) and setup recorded no reason in {}: run `sudo scripts/setup`", buildkit_net_socket(), unavailable().display()).into()))
            })
            .collect(),
    };
    libtest_mimic::run(&args, trials).exit();
}
