//! A test CA (openssl) playing the person at the portal: answers the outbox into the inbox.

use std::path::Path;
use std::time::Duration;

/// How the test CA answers the portal.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CaMode {
    /// Sign the CSR as asked.
    Good,
    /// Sign it with another subject.
    WrongSubject,
    /// Sign it already expired.
    Expired,
    /// Sign it valid only from next year.
    NotYetValid,
    /// Sign it with a CA the device does not trust.
    ForeignCa,
    /// Answer with a certificate for another key.
    WrongKey,
    /// Sign it without the SANs.
    NoSans,
    /// Sign it, and drop a private key block in the same file (a careless person).
    AppendKey,
    /// Sign this one valid for the given seconds from now, then go `Away`.
    ShortLived(u32),
    /// Answer nothing (the person is away): CSRs wait in the outbox.
    Away,
}

/// A test CA (openssl) answering a portal outbox into an inbox from a background thread.
pub struct PortalCa {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    mode: std::sync::Arc<std::sync::Mutex<CaMode>>,
    handle: Option<std::thread::JoinHandle<()>>,
}

impl PortalCa {
    /// Start answering `outbox` into `inbox` with the CA `ca` ({ca}.pem/{ca}.key in `dir`).
    pub fn start(dir: &Path, ca: &str, outbox: &Path, inbox: &Path, mode: CaMode) -> PortalCa {
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let mode = std::sync::Arc::new(std::sync::Mutex::new(mode));
        let (dir, ca, outbox, inbox) = (
            dir.to_owned(),
            ca.to_owned(),
            outbox.to_owned(),
            inbox.to_owned(),
        );
        let (s2, m2) = (stop.clone(), mode.clone());
        let handle = std::thread::spawn(move || {
            let mut done = std::collections::HashSet::new();
            while !s2.load(std::sync::atomic::Ordering::SeqCst) {
                if let Ok(rd) = std::fs::read_dir(&outbox) {
                    for e in rd.flatten() {
                        let p = e.path();
                        let name = p
                            .file_name()
                            .map(|n| n.to_string_lossy().into_owned())
                            .unwrap_or_default();
                        let mode = *m2.lock().unwrap();
                        if !name.ends_with(".csr.pem")
                            || done.contains(&name)
                            || mode == CaMode::Away
                        {
                            continue;
                        }
                        done.insert(name.clone());
                        if let CaMode::ShortLived(_) = mode {
                            *m2.lock().unwrap() = CaMode::Away;
                        }
                        sign_for_portal(
                            &dir,
                            &ca,
                            &p,
                            &inbox.join(name.replace(".csr.pem", ".crt")),
                            mode,
                        );
                    }
                }
                std::thread::sleep(Duration::from_millis(50));
            }
        });
        PortalCa {
            stop,
            mode,
            handle: Some(handle),
        }
    }

    /// Change how the next CSRs are answered.
    pub fn set_mode(&self, m: CaMode) {
        *self.mode.lock().unwrap() = m;
    }
}

impl Drop for PortalCa {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::SeqCst);
        if let Some(h) = self.handle.take() {
            let _ = h.join();
        }
    }
}

/// The CA and the CSR file `mode` signs with: the foreign CA, another key's CSR or the
/// device's CSR as is.
fn signing_input(dir: &Path, ca: &str, csr: &Path, mode: CaMode) -> (String, String) {
    let run = |args: &[&str]| {
        crate::openssl_in(dir, args);
    };
    match mode {
        CaMode::ForeignCa => {
            if !dir.join("foreign-ca.pem").exists() {
                let args = crate::ca_args("foreign-ca");
                run(&args.iter().map(String::as_str).collect::<Vec<_>>());
            }
            ("foreign-ca".to_owned(), csr.display().to_string())
        }
        CaMode::WrongKey | CaMode::WrongSubject => {
            // Another key (WrongKey) or the same key under another subject (WrongSubject).
            let other = dir.join("other.csr");
            if mode == CaMode::WrongKey {
                run(&[
                    "req",
                    "-new",
                    "-newkey",
                    "ec",
                    "-pkeyopt",
                    "ec_paramgen_curve:P-256",
                    "-nodes",
                    "-keyout",
                    "other.key",
                    "-out",
                    &other.display().to_string(),
                    "-subj",
                    "/CN=other",
                ]);
            } else {
                run(&[
                    "req",
                    "-in",
                    &csr.display().to_string(),
                    "-out",
                    &other.display().to_string(),
                ]);
            }
            (ca.to_owned(), other.display().to_string())
        }
        _ => (ca.to_owned(), csr.display().to_string()),
    }
}

fn sign_for_portal(dir: &Path, ca: &str, csr: &Path, out: &Path, mode: CaMode) {
    let run = |args: &[&str]| {
        crate::openssl_in(dir, args);
    };
    let ext = dir.join("portal-ext.cnf");
    std::fs::write(&ext, "basicConstraints=CA:FALSE\nkeyUsage=digitalSignature\nextendedKeyUsage=clientAuth,serverAuth\n").expect("ext");
    let (ca_name, csr_path) = signing_input(dir, ca, csr, mode);
    std::fs::create_dir_all(out.parent().expect("inbox")).expect("inbox");
    let tmp = out.with_extension("tmp");
    if let Some((start, end)) = match mode {
        CaMode::Expired => Some(("20200101000000Z".into(), "20200201000000Z".into())),
        CaMode::NotYetValid => Some(("20990101000000Z".into(), "20991231000000Z".into())),
        CaMode::ShortLived(secs) => {
            let now = edge_signer::clock::Clock::now(&edge_signer::clock::SystemClock);
            Some((asn1_time(now - 60), asn1_time(now + u64::from(secs))))
        }
        _ => None,
    } {
        sign_dated(dir, ca, csr, &ext, &tmp, (&start, &end));
        std::fs::rename(&tmp, out).expect("drop into inbox");
        return;
    }
    let mut args: Vec<String> = vec![
        "x509".into(),
        "-req".into(),
        "-in".into(),
        csr_path,
        "-CA".into(),
        format!("{ca_name}.pem"),
        "-CAkey".into(),
        format!("{ca_name}.key"),
        "-set_serial".into(),
        format!("{}", 1000 + std::process::id() % 1000 + rand_serial()),
        "-extfile".into(),
        ext.display().to_string(),
        "-out".into(),
        tmp.display().to_string(),
    ];
    args.extend(["-days".into(), "90".into()]);
    if mode != CaMode::NoSans {
        args.extend(["-copy_extensions".into(), "copy".into()]);
    }
    if mode == CaMode::WrongSubject {
        args.extend(["-subj".into(), "/O=Mallory/CN=not-you".into()]);
    }
    let argv: Vec<&str> = args.iter().map(String::as_str).collect();
    run(&argv);
    if mode == CaMode::AppendKey {
        let key = std::fs::read_to_string(dir.join(format!("{ca}.key"))).expect("key");
        let cert = std::fs::read_to_string(&tmp).expect("cert");
        std::fs::write(&tmp, format!("{cert}{key}")).expect("append");
    }
    std::fs::rename(&tmp, out).expect("drop into inbox");
}

/// Sign `csr` with CA `ca` for the given (start, end) dates into `tmp` (openssl 3.0's
/// `x509 -req` cannot set dates; `openssl ca` can).
fn sign_dated(
    dir: &Path,
    ca: &str,
    csr: &Path,
    ext: &Path,
    tmp: &Path,
    (start, end): (&str, &str),
) {
    let db = dir.join("ca-db");
    std::fs::create_dir_all(db.join("new")).expect("ca db");
    std::fs::write(db.join("index.txt"), "").expect("index");
    std::fs::write(db.join("serial"), format!("{:08X}\n", 4096 + rand_serial())).expect("serial");
    let cnf = db.join("ca.cnf");
    std::fs::write(
        &cnf,
        format!(
            "[ca]\ndefault_ca = d\n[d]\ndatabase = {0}/index.txt\nnew_certs_dir = {0}/new\nserial = {0}/serial\ndefault_md = sha256\npolicy = p\ncopy_extensions = copy\nunique_subject = no\n[p]\ncommonName = supplied\norganizationName = optional\norganizationalUnitName = optional\n",
            db.display()
        ),
    )
    .expect("ca.cnf");
    crate::openssl_in(
        dir,
        &[
            "ca",
            "-batch",
            "-notext",
            "-preserveDN",
            "-config",
            &cnf.display().to_string(),
            "-cert",
            &format!("{ca}.pem"),
            "-keyfile",
            &format!("{ca}.key"),
            "-in",
            &csr.display().to_string(),
            "-out",
            &tmp.display().to_string(),
            "-startdate",
            start,
            "-enddate",
            end,
            "-extfile",
            &ext.display().to_string(),
        ],
    );
}

/// `YYYYMMDDHHMMSSZ` of a Unix time (what `openssl ca -startdate/-enddate` take).
fn asn1_time(t: u64) -> String {
    edge_signer::clock::rfc3339(t)
        .chars()
        .filter(|c| c.is_ascii_digit())
        .collect::<String>()
        + "Z"
}

fn rand_serial() -> u32 {
    use std::time::{SystemTime, UNIX_EPOCH};
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.subsec_nanos() % 100_000)
        .unwrap_or(7)
}
