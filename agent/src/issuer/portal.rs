//! The portal issuer: a CSR goes to an outbox for a person to upload; the signed certificate
//! comes back (about a day later) as any file in the inbox, recognised by its public key.

use super::{Issuer, IssuerAnswer, Request, Submitted};
use crate::clock::Unix;
use hsm_shim::rustls::pki_types::CertificateDer;
use std::path::PathBuf;

/// A drop-folder issuer.
pub struct Portal {
    outbox: PathBuf,
    inbox: PathBuf,
    poll: u64,
    ca: Vec<CertificateDer<'static>>,
}

impl Portal {
    /// From config; reads the CA bundle now so a wrong path is reported at start.
    pub fn new(cfg: &firmware_config::schema::PortalIssuer) -> crate::error::Result<Portal> {
        Ok(Portal {
            outbox: cfg.outbox.clone(),
            inbox: cfg.inbox.clone(),
            poll: cfg.poll_interval.secs().max(1),
            ca: crate::tlsconf::load_certs(&cfg.ca_bundle)?,
        })
    }

    fn csr_name(req: &Request) -> String {
        format!("{}-{}.csr.pem", req.identity, req.generation)
    }
}

impl Issuer for Portal {
    fn submit(&mut self, req: &Request, _now: Unix) -> Result<Submitted, IssuerAnswer> {
        let name = Self::csr_name(req);
        std::fs::create_dir_all(&self.outbox)
            .and_then(|_| {
                firmware_config::store::atomic_write(
                    &self.outbox.join(&name),
                    req.csr_pem.as_bytes(),
                )
            })
            .map_err(|e| {
                IssuerAnswer::Unreachable(format!(
                    "cannot write {} to {}: {e}",
                    name,
                    self.outbox.display()
                ))
            })?;
        Ok(Submitted {
            reference: name,
            answer: None,
        })
    }

    fn poll(&mut self, req: &Request, reference: &str, now: Unix) -> IssuerAnswer {
        let mut foreign = Vec::new();
        let entries = match std::fs::read_dir(&self.inbox) {
            Ok(rd) => rd,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return IssuerAnswer::Wait {
                    until: now + self.poll,
                    what: format!(
                        "certificate for {reference} in {} (not created yet)",
                        self.inbox.display()
                    ),
                }
            }
            Err(e) => {
                return IssuerAnswer::Unreachable(format!(
                    "cannot read {}: {e}",
                    self.inbox.display()
                ))
            }
        };
        // Only certificates dropped after this CSR went out are worth mentioning when foreign.
        let since = std::fs::metadata(self.outbox.join(reference))
            .and_then(|m| m.modified())
            .ok();
        let mut files: Vec<PathBuf> = entries
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.is_file())
            .collect();
        files.sort();
        for f in files {
            // Bounded read: the inbox is written by people and other programs.
            let Ok(meta) = f.metadata() else { continue };
            if meta.len() > 256 * 1024 {
                continue;
            }
            let Ok(text) = std::fs::read_to_string(&f) else {
                continue;
            };
            match crate::validate::leaf_spki(&text) {
                // Only the certificates, re-encoded: nothing else in a dropped file (a private
                // key block, text) reaches the register or cert.pem.
                Some(spki) if spki == req.spki => {
                    return match crate::validate::parse_chain(&text) {
                        Ok(chain) => IssuerAnswer::Issued(crate::validate::to_pem(&chain)),
                        Err(e) => IssuerAnswer::Unreachable(e.to_string()),
                    }
                }
                Some(_) if since.is_none_or(|t| meta.modified().is_ok_and(|m| m >= t)) => foreign
                    .push(
                        f.file_name()
                            .map(|n| n.to_string_lossy().into_owned())
                            .unwrap_or_default(),
                    ),
                Some(_) => {}
                None => {}
            }
        }
        let mut what = format!("certificate for {reference} in {}", self.inbox.display());
        if !foreign.is_empty() {
            what += &format!(
                "; ignoring {} certificate(s) for other keys: {}",
                foreign.len(),
                foreign.join(", ")
            );
        }
        IssuerAnswer::Wait {
            until: now + self.poll,
            what,
        }
    }

    fn ca_bundle(&self) -> &[CertificateDer<'static>] {
        &self.ca
    }

    fn poll_interval(&self) -> Option<u64> {
        Some(self.poll)
    }
}
