//! Debian's `pebble` (the ACME test CA Let's Encrypt publishes) and `pebble-challtestsrv`
//! (its DNS), started on loopback ports for one test. Pebble's awkward defaults stay on: it
//! refuses a share of nonces (`PEBBLE_WFE_NONCEREJECT`) and reuses half of the valid
//! authorizations; only its random validation sleeps are off (`PEBBLE_VA_NOSLEEP`), which
//! changes timing, not behaviour.

use crate::{free_port, wait_port, Env, Guard};
use std::process::{Command, Stdio};

/// A running pebble and its DNS.
pub struct Pebble {
    _pebble: Guard,
    _dns: Guard,
    /// The directory URL.
    pub directory: String,
    /// Port pebble validates `http-01` on (the agent's `http01_listen`).
    pub http_port: u16,
    /// Port pebble validates `tls-alpn-01` on.
    pub tls_port: u16,
    /// pebble-challtestsrv's management port (TXT records for dns-01).
    pub dns_management: u16,
    /// Pebble's management port (roots, intermediates).
    pub management: u16,
}

/// Pebble options.
#[derive(Default)]
pub struct PebbleOptions {
    /// External account binding required, with this key id and base64url HMAC key.
    pub eab: Option<(String, String)>,
    /// Alternate roots (`PEBBLE_ALTERNATE_ROOTS`): each issues an alternate chain, served
    /// through `Link: rel="alternate"`; their PEMs are `acme-root-1.pem`, ...
    pub alternate_roots: u32,
}

impl Pebble {
    /// Start pebble with its HTTPS certificate `pebble.pem` (made from `ca` here) and its
    /// DNS answering 127.0.0.1 for every name.
    pub fn start(env: &Env, opts: PebbleOptions) -> Pebble {
        env.openssl_leaf("ca", "pebble");
        let (listen, management, http_port, tls_port) =
            (free_port(), free_port(), free_port(), free_port());
        let (dns_port, dns_management) = (free_port(), free_port());
        let dns = Command::new("pebble-challtestsrv")
            .args(["-defaultIPv4", "127.0.0.1", "-defaultIPv6", ""])
            .args(["-dns01", &format!("127.0.0.1:{dns_port}")])
            .args(["-http01", "", "-https01", "", "-tlsalpn01", ""])
            .args(["-management", &format!("127.0.0.1:{dns_management}")])
            .stdout(std::fs::File::create(env.path("challtestsrv.log")).expect("log"))
            .stderr(Stdio::null())
            .spawn()
            .expect("pebble-challtestsrv (scripts/setup installs pebble)");
        let dns = Guard(dns);
        wait_port(dns_management);
        let (eab_required, keys) = match &opts.eab {
            Some((kid, key)) => (true, serde_json::json!({ kid: key })),
            None => (false, serde_json::json!({})),
        };
        let cfg = serde_json::json!({"pebble": {
            "listenAddress": format!("127.0.0.1:{listen}"),
            "managementListenAddress": format!("127.0.0.1:{management}"),
            "certificate": env.path_str("pebble.pem"),
            "privateKey": env.path_str("pebble.key"),
            "httpPort": http_port,
            "tlsPort": tls_port,
            "ocspResponderURL": "",
            "externalAccountBindingRequired": eab_required,
            "externalAccountMACKeys": keys,
        }});
        std::fs::write(env.path("pebble.json"), cfg.to_string()).unwrap();
        let pebble = Command::new("pebble")
            .args(["-config", &env.path_str("pebble.json")])
            .args(["-dnsserver", &format!("127.0.0.1:{dns_port}")])
            .env("PEBBLE_VA_NOSLEEP", "1")
            .env("PEBBLE_ALTERNATE_ROOTS", opts.alternate_roots.to_string())
            .stdout(std::fs::File::create(env.path("pebble.log")).expect("log"))
            .stderr(Stdio::null())
            .spawn()
            .expect("pebble (scripts/setup installs it)");
        let pebble = Guard(pebble);
        wait_port(listen);
        wait_port(management);
        let p = Pebble {
            _pebble: pebble,
            _dns: dns,
            directory: format!("https://127.0.0.1:{listen}/dir"),
            http_port,
            tls_port,
            dns_management,
            management,
        };
        // The root pebble made at this start: issued chains must reach it.
        let root = env.curl_https(&format!("https://127.0.0.1:{management}/roots/0"));
        std::fs::write(env.path("acme-root.pem"), root).unwrap();
        for i in 1..=opts.alternate_roots {
            let alt = env.curl_https(&format!("https://127.0.0.1:{management}/roots/{i}"));
            std::fs::write(env.path(&format!("acme-root-{i}.pem")), alt).unwrap();
        }
        p
    }

    /// A dns-01 hook script that sets and clears TXT records in pebble-challtestsrv (the
    /// agent runs hooks with a clean environment: the port is written into the script).
    pub fn dns_hook(&self, env: &Env) -> String {
        let path = env.path("dns-hook.sh");
        let script = format!(
            "#!/bin/sh\n# dns01_hook ACTION NAME VALUE\nset -e\necho \"$@\" >> {log}\n\
             case \"$1\" in\n  set) curl -sf -X POST -d \"{{\\\"host\\\":\\\"$2.\\\",\\\"value\\\":\\\"$3\\\"}}\" http://127.0.0.1:{port}/set-txt ;;\n  \
             clear) curl -sf -X POST -d \"{{\\\"host\\\":\\\"$2.\\\"}}\" http://127.0.0.1:{port}/clear-txt ;;\nesac\n",
            log = env.path_str("dns-hook.log"),
            port = self.dns_management
        );
        std::fs::write(&path, script).unwrap();
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
        path.display().to_string()
    }

    /// An `[[issuer]]` table for this pebble named `acme`, then `extra` lines.
    pub fn issuer_toml(&self, env: &Env, extra: &str) -> String {
        format!(
            "\n[[issuer]]\nname = \"acme\"\nkind = \"acme\"\ndirectory = \"{dir}\"\n\
             ca_bundle = \"{root}\"\nserver_ca = \"{ca}\"\n\
             http01_listen = \"127.0.0.1:{http}\"\ntls_alpn01_listen = \"127.0.0.1:{tls}\"\n{extra}\n",
            dir = self.directory,
            root = env.path_str("acme-root.pem"),
            ca = env.path_str("ca.pem"),
            http = self.http_port,
            tls = self.tls_port,
        )
    }
}

/// A configuration with one identity `web` (DNS name `NAME.example`) enrolled by pebble
/// with `issuer_extra` in its issuer table.
pub fn acme_config(env: &Env, pebble: &Pebble, name: &str, issuer_extra: &str) {
    let cfg = format!(
        "{token}\n[[identity]]\nname = \"web\"\nsubject = {{ cn = \"{name}.example\" }}\n\
         sans = [\"dns:{name}.example\"]\nissuer = \"acme\"\nusage = [\"server\"]\n\
         subject_match = \"none\"\noverlap = \"1h\"\n\
         [identity.renewal]\nretry_min = \"1s\"\nretry_max = \"2s\"\n{issuer}\n\
         [paths]\nstate_dir = \"{p}/state\"\n",
        token = env.token_toml(),
        issuer = pebble.issuer_toml(env, issuer_extra),
        p = env.dir.path().display(),
    );
    std::fs::write(env.path("defaults.toml"), cfg).unwrap();
}

impl Env {
    /// GET an https URL whose server certificate chains to this env's `ca.pem`.
    pub fn curl_https(&self, url: &str) -> String {
        let out = Command::new("curl")
            .args(["-sSf", "--cacert", &self.path_str("ca.pem"), url])
            .output()
            .expect("curl");
        assert!(out.status.success(), "curl {url}: {out:?}");
        String::from_utf8_lossy(&out.stdout).into_owned()
    }
}

/// A fresh env with its test CA (`ca`, which signs pebble's HTTPS certificate) and pebble.
pub fn pebble_env(opts: PebbleOptions) -> (Env, Pebble) {
    let env = Env::new();
    env.make_ca("ca");
    let pebble = Pebble::start(&env, opts);
    (env, pebble)
}

/// [`pebble_env`] with pebble's defaults and identity `web` (`NAME.example`) configured
/// with `issuer_extra` ([`acme_config`]).
pub fn acme_env(name: &str, issuer_extra: &str) -> (Env, Pebble) {
    let (env, pebble) = pebble_env(PebbleOptions::default());
    acme_config(&env, &pebble, name, issuer_extra);
    (env, pebble)
}
