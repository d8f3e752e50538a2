//! The flat form of a generation in the register file, and its conversion to and from the
//! typed one: a combination no step makes (a certificate without its key, half a
//! certificate) is refused with what is wrong, never filled in.

use super::{GenStatus, Generation, IssuedCert, KeyRecord, Material, RotationRequest};
use crate::clock::Unix;
use serde::{Deserialize, Serialize};

/// A generation as the register file holds it: flat, every field an option whose presence
/// depends on the step (the form every release so far wrote and reads).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(super) struct GenerationFile {
    number: u32,
    status: GenStatus,
    key_label: String,
    key_id: Option<String>,
    key_uri: Option<String>,
    subject: String,
    sans: Vec<String>,
    csr_pem: Option<String>,
    issuer: String,
    submission: Option<String>,
    cert_pem: Option<String>,
    serial: Option<String>,
    fingerprint: Option<String>,
    not_before: Option<Unix>,
    not_after: Option<Unix>,
    overlap_until: Option<Unix>,
    reminders_fired: Vec<u64>,
    created_at: Unix,
    #[serde(default)]
    kid: Option<String>,
    #[serde(default)]
    request: Option<String>,
    #[serde(default)]
    previous_expiry: Option<Unix>,
    #[serde(default)]
    sent_at: Option<Unix>,
    #[serde(default)]
    subject_issued: Option<String>,
    #[serde(default)]
    name_differences: Vec<String>,
}

impl GenerationFile {
    fn material(&mut self) -> Result<Material, String> {
        let key = match (self.key_id.take(), self.key_uri.take()) {
            (None, None) => None,
            (Some(id), Some(uri)) => Some(KeyRecord {
                id: hsm_shim::keys::unhex(&id).ok_or(format!("key id '{id}' is not hex"))?,
                uri,
            }),
            (Some(_), None) => return Err("a key id without a key URI".into()),
            (None, Some(_)) => return Err("a key URI without a key id".into()),
        };
        let validity = match (self.not_before, self.not_after) {
            (Some(nb), Some(na)) => Some((nb, na)),
            (None, None) => None,
            _ => return Err("only one of not_before and not_after".into()),
        };
        let submission = self.submission.take();
        let Some(key) = key else {
            if self.csr_pem.is_some() || self.cert_pem.is_some() || self.kid.is_some() {
                return Err("a CSR, certificate or kid without a key".into());
            }
            return Ok(Material::Planned);
        };
        if let Some(kid) = self.kid.take() {
            let request = match (self.request.take(), self.previous_expiry) {
                (Some(body), Some(previous_expiry)) => Some(RotationRequest {
                    body,
                    previous_expiry,
                }),
                (None, _) => None,
                (Some(_), None) => return Err("a rotation request without previous_expiry".into()),
            };
            return Ok(Material::Credential {
                key,
                kid,
                request,
                sent_at: self.sent_at,
                submission,
                validity,
            });
        }
        let csr_pem = self
            .csr_pem
            .take()
            .ok_or("a certificate identity's key without its CSR")?;
        let Some(chain_pem) = self.cert_pem.take() else {
            return Ok(Material::Requested {
                key,
                csr_pem,
                submission,
            });
        };
        match (self.serial.take(), self.fingerprint.take(), validity) {
            (Some(serial), Some(fingerprint), Some((not_before, not_after))) => {
                Ok(Material::Certified {
                    key,
                    csr_pem,
                    submission,
                    cert: IssuedCert {
                        chain_pem,
                        serial,
                        fingerprint,
                        not_before,
                        not_after,
                        subject_issued: self.subject_issued.take(),
                        name_differences: std::mem::take(&mut self.name_differences),
                    },
                })
            }
            (None, None, None) => Ok(Material::Issued {
                key,
                csr_pem,
                submission,
                chain_pem,
            }),
            _ => Err("a certificate with only part of its serial, fingerprint and dates".into()),
        }
    }
}

impl TryFrom<GenerationFile> for Generation {
    type Error = String;

    fn try_from(mut f: GenerationFile) -> Result<Generation, String> {
        let material = f
            .material()
            .map_err(|e| format!("generation {}: {e}", f.number))?;
        Ok(Generation {
            number: f.number,
            status: f.status,
            key_label: f.key_label,
            subject: f.subject,
            sans: f.sans,
            issuer: f.issuer,
            created_at: f.created_at,
            overlap_until: f.overlap_until,
            reminders_fired: f.reminders_fired,
            material,
        })
    }
}

impl From<Generation> for GenerationFile {
    fn from(g: Generation) -> GenerationFile {
        let mut f = GenerationFile {
            number: g.number,
            status: g.status,
            key_label: g.key_label,
            key_id: None,
            key_uri: None,
            subject: g.subject,
            sans: g.sans,
            csr_pem: None,
            issuer: g.issuer,
            submission: None,
            cert_pem: None,
            serial: None,
            fingerprint: None,
            not_before: None,
            not_after: None,
            overlap_until: g.overlap_until,
            reminders_fired: g.reminders_fired,
            created_at: g.created_at,
            kid: None,
            request: None,
            previous_expiry: None,
            sent_at: None,
            subject_issued: None,
            name_differences: Vec::new(),
        };
        f.put(g.material);
        f
    }
}

impl GenerationFile {
    fn put_key(&mut self, key: KeyRecord, submission: Option<String>) {
        self.key_id = Some(key.id_hex());
        self.key_uri = Some(key.uri);
        self.submission = submission;
    }

    fn put(&mut self, material: Material) {
        match material {
            Material::Planned => {}
            Material::Requested {
                key,
                csr_pem,
                submission,
            } => {
                self.put_key(key, submission);
                self.csr_pem = Some(csr_pem);
            }
            Material::Issued {
                key,
                csr_pem,
                submission,
                chain_pem,
            } => {
                self.put_key(key, submission);
                self.csr_pem = Some(csr_pem);
                self.cert_pem = Some(chain_pem);
            }
            Material::Certified {
                key,
                csr_pem,
                submission,
                cert,
            } => {
                self.put_key(key, submission);
                self.csr_pem = Some(csr_pem);
                self.cert_pem = Some(cert.chain_pem);
                self.serial = Some(cert.serial);
                self.fingerprint = Some(cert.fingerprint);
                self.not_before = Some(cert.not_before);
                self.not_after = Some(cert.not_after);
                self.subject_issued = cert.subject_issued;
                self.name_differences = cert.name_differences;
            }
            Material::Credential {
                key,
                kid,
                request,
                sent_at,
                submission,
                validity,
            } => {
                self.put_key(key, submission);
                self.kid = Some(kid);
                if let Some(r) = request {
                    self.request = Some(r.body);
                    self.previous_expiry = Some(r.previous_expiry);
                }
                self.sent_at = sent_at;
                self.not_before = validity.map(|v| v.0);
                self.not_after = validity.map(|v| v.1);
            }
        }
    }
}
