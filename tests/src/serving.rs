//! Helpers for the serving tests: a daemon with proxies and the API, curl over Unix sockets.

use crate::{free_port, Env, Guard};
use std::process::{Command, Output};

impl Env {
    /// Firmware defaults for identity `gw` (portal, generation CN suffix, `overlap`) plus
    /// `extra` TOML (proxies, API rules) appended. `{p}` in `extra` is the temp dir.
    pub fn serving_config(&self, overlap: &str, extra: &str) {
        self.lifecycle_config("cn_suffix = \"generation\"");
        let p = self.dir.path().display().to_string();
        let cfg = std::fs::read_to_string(self.path("defaults.toml"))
            .expect("config")
            .replace("overlap = \"1d\"", &format!("overlap = \"{overlap}\""));
        std::fs::write(self.path("defaults.toml"), cfg + &extra.replace("{p}", &p))
            .expect("config");
    }

    /// Start the daemon with its log in `daemon.log`.
    pub fn daemon(&self) -> Guard {
        self.daemon_logging(None)
    }

    /// The same, logging warnings and errors only (benches: no log I/O in the measurement).
    pub fn quiet_daemon(&self) -> Guard {
        self.daemon_logging(Some("warn"))
    }

    /// The daemon with `vars` in its environment (test hooks).
    pub fn daemon_with(&self, vars: &[(&str, &str)]) -> Guard {
        let mut cmd = self.cmd();
        cmd.envs(vars.iter().copied())
            .arg("run")
            .stderr(std::fs::File::create(self.path("daemon.log")).expect("log"));
        Guard(cmd.spawn().expect("daemon"))
    }

    fn daemon_logging(&self, level: Option<&str>) -> Guard {
        let mut cmd = self.cmd();
        cmd.arg("run")
            .stderr(std::fs::File::create(self.path("daemon.log")).expect("log"));
        if let Some(level) = level {
            cmd.env("EDGE_SIGNER_LOG", level);
        }
        Guard(cmd.spawn().expect("daemon"))
    }

    /// `curl -s --unix-socket {sock} http://edge/{path}` plus `args`, in the temp dir.
    pub fn curl(&self, sock: &str, path: &str, args: &[&str]) -> Output {
        Command::new("curl")
            .args([
                "-sS",
                "--max-time",
                "10",
                "--unix-socket",
                &self.path_str(sock),
            ])
            .args(args)
            .arg(format!("http://edge{path}"))
            .current_dir(self.dir.path())
            .output()
            .expect("curl")
    }

    /// The same as user `nobody` (setpriv), after opening the temp dir to others.
    pub fn curl_as_nobody(&self, sock: &str, path: &str, args: &[&str]) -> Output {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(self.dir.path(), std::fs::Permissions::from_mode(0o755))
            .expect("chmod");
        Command::new("setpriv")
            .args([
                "--reuid=65534",
                "--regid=65534",
                "--clear-groups",
                "curl",
                "-sS",
            ])
            .args(["--max-time", "10", "--unix-socket", &self.path_str(sock)])
            .args(args)
            .arg(format!("http://edge{path}"))
            .output()
            .expect("setpriv curl")
    }

    /// Wait until the register has `identity` at generation `n` *and* the daemon serves
    /// it: the served pair follows the register after the engine's pass, so a connection
    /// made in between is refused (no certificate yet) or gets the older generation.
    pub fn wait_served(&self, identity: &str, n: u64) {
        self.wait_current(identity, n);
        // `... serving identity switched: ... identity=gw generation=1`, fields as words.
        let (who, which) = (format!("identity={identity}"), format!("generation={n}"));
        self.wait_log_line(&format!("{identity} generation {n} served"), |l| {
            let words: Vec<&str> = l.split_whitespace().collect();
            l.contains("serving identity switched")
                && words.contains(&who.as_str())
                && words.contains(&which.as_str())
        });
    }

    /// Wait (20 s at most) until a line of `daemon.log` contains `what`.
    pub fn wait_log(&self, what: &str) {
        self.wait_log_line(&format!("{what:?} logged"), |l| l.contains(what));
    }

    /// Wait (20 s at most) until a line of `daemon.log` satisfies `line`; on failure the
    /// message names `what` and shows the log.
    fn wait_log_line(&self, what: &str, line: impl Fn(&str) -> bool) {
        let log = || std::fs::read_to_string(self.path("daemon.log")).unwrap_or_default();
        let seen = crate::poll_until(20, std::time::Duration::from_millis(50), || {
            log().lines().any(&line)
        });
        assert!(seen, "never: {what}\n{}", log());
    }
}

/// A `[[proxy]]` table for `serving_config`: `name` listening on `listen` (`{p}/x.sock` or
/// `127.0.0.1:PORT`) for identity gw, to `127.0.0.1:target` checked against `server_ca`,
/// then the `extra` lines.
pub fn proxy_table(name: &str, listen: &str, target: u16, server_ca: &str, extra: &str) -> String {
    format!(
        "\n[[proxy]]\nname = \"{name}\"\nlisten = \"{listen}\"\ntarget = \"127.0.0.1:{target}\"\n\
         identity = \"gw\"\nserver_ca = \"{server_ca}\"\n{extra}\n"
    )
}

/// A loopback port for a TCP proxy listener.
pub fn proxy_port() -> u16 {
    free_port()
}

/// The body length of an HTTP/1.1 response head (bytes before the blank line), which must
/// say 200: what the API tests and the serving bench read of each answer.
pub fn ok_body_len(head: &[u8]) -> usize {
    let head = String::from_utf8_lossy(head).to_ascii_lowercase();
    assert!(head.starts_with("http/1.1 200"), "{head}");
    head.lines()
        .find_map(|l| l.strip_prefix("content-length:"))
        .unwrap_or_else(|| panic!("no content-length in {head}"))
        .trim()
        .parse()
        .unwrap_or_else(|e| panic!("content-length in {head}: {e}"))
}

/// An `[api]` on `{p}/api.sock` that lets this uid read `/metrics`.
pub fn metrics_api_toml() -> String {
    format!(
        "\n[api]\nenabled = true\nsocket = \"{{p}}/api.sock\"\n\n[[api.allow]]\nuids = [{}]\nidentities = [\"*\"]\noperations = [\"metrics\"]\n",
        crate::my_uid()
    )
}

/// The sum of the samples of `metric` whose labels include every pair of `labels`, in the
/// Prometheus text `text` (which must parse).
pub fn metric_sum(text: &str, metric: &str, labels: &[(&str, &str)]) -> f64 {
    let lines = text.lines().map(|l| Ok(l.to_owned()));
    prometheus_parse::Scrape::parse(lines)
        .expect("Prometheus text")
        .samples
        .iter()
        .filter(|s| s.metric == metric && labels.iter().all(|(k, v)| s.labels.get(k) == Some(*v)))
        .map(|s| match s.value {
            prometheus_parse::Value::Counter(v) | prometheus_parse::Value::Untyped(v) => v,
            _ => 0.0,
        })
        .sum()
}

impl Env {
    /// The daemon's `/metrics` text, through `{p}/api.sock`.
    pub fn metrics_text(&self) -> String {
        let out = self.curl("api.sock", "/metrics", &[]);
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// For each of `steps`, from generation 1 current: `rotate NAME --now` killed right after
    /// the step is on disk, then `rotate NAME`, which must finish that generation with the
    /// submission the register held at the kill (an issuer's order or transaction is never
    /// made twice); at the steps in `submitted` that submission must already be on disk. Each
    /// round retires the generation before it (the next rotation needs the overlap over).
    pub fn kill_at_each_step_and_resume(
        &self,
        name: &str,
        secs: u32,
        steps: &[&str],
        submitted: &[&str],
    ) {
        let t = secs.to_string();
        for (n, step) in (2..).zip(steps) {
            self.rotate_killed_after(name, secs, step);
            let before = self.generation(name, n).submission().map(str::to_owned);
            self.ok(&["rotate", name, "--timeout", &t]);
            let rec = self.record(name);
            assert_eq!(rec.current, Some(n), "{step}: {rec:?}");
            if submitted.contains(step) {
                assert!(
                    before.is_some(),
                    "{step}: the submission is in the register"
                );
            }
            if before.is_some() {
                assert_eq!(
                    self.generation(name, n).submission(),
                    before.as_deref(),
                    "{step}: the same submission finished"
                );
            }
            self.ok(&["retire", name, "--generation", &(n - 1).to_string()]);
        }
    }

    /// `rotate NAME --now` killed (`kill -9`, the test hook) right after `step` is on disk;
    /// insists it was.
    pub fn rotate_killed_after(&self, name: &str, secs: u32, step: &str) {
        use std::os::unix::process::ExitStatusExt;
        let out = self.rotate_now_with(name, secs, ("EDGE_SIGNER_TEST_KILL_AT", step));
        assert_eq!(
            out.status.signal(),
            Some(9),
            "{step}: not killed: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
}
