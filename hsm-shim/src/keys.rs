//! Key pairs and certificate objects in the token, named by `CKA_ID` and `CKA_LABEL`.

use crate::asn1;
use crate::error::{Error, Result};
use crate::token::Token;
use crate::uri::{ObjectType, Pkcs11Uri};
use cryptoki::mechanism::Mechanism;
use cryptoki::object::{
    Attribute, AttributeType, CertificateType, KeyType as CkKeyType, ObjectClass, ObjectHandle,
};
use cryptoki::session::Session;

pub use crate::alg::KeyType;
use crate::alg::{P256_PARAMS, P384_PARAMS};

/// A private key object named by its `CKA_ID` and `CKA_LABEL` only.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyLabel {
    /// `CKA_ID`.
    pub id: Vec<u8>,
    /// `CKA_LABEL`.
    pub label: String,
}

/// A key pair in the token, as found or generated.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyInfo {
    /// `CKA_ID`.
    pub id: Vec<u8>,
    /// `CKA_LABEL`.
    pub label: String,
    /// Key type.
    pub key_type: KeyType,
    /// SubjectPublicKeyInfo, DER.
    pub spki: Vec<u8>,
    /// The subjectPublicKey bits (EC point or RSAPublicKey DER), as rcgen wants them.
    pub public_bits: Vec<u8>,
    /// Whether a certificate object with the same `CKA_ID` exists.
    pub has_cert: bool,
}

impl KeyInfo {
    /// The RFC 7512 URI of the private key.
    pub fn uri(&self, token: &Token) -> Pkcs11Uri {
        Pkcs11Uri {
            token: Some(token.label().to_owned()),
            id: Some(self.id.clone()),
            object: Some(self.label.clone()),
            object_type: Some(ObjectType::Private),
            ..Default::default()
        }
    }

    /// Public key as PEM.
    pub fn spki_pem(&self) -> String {
        crate::pem("PUBLIC KEY", &self.spki)
    }
}

/// Which key to use: by id (preferred) or by label.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KeyRef {
    /// `CKA_ID` bytes.
    Id(Vec<u8>),
    /// `CKA_LABEL`.
    Label(String),
}

impl KeyRef {
    /// From a `pkcs11:` URI: its `id` if present, else its `object`.
    pub fn from_uri(uri: &Pkcs11Uri) -> Result<KeyRef> {
        if let Some(id) = &uri.id {
            Ok(KeyRef::Id(id.clone()))
        } else if let Some(o) = &uri.object {
            Ok(KeyRef::Label(o.clone()))
        } else {
            Err(Error::Uri(format!(
                "{uri} names no key: give id= or object="
            )))
        }
    }

    fn attr(&self) -> Attribute {
        match self {
            KeyRef::Id(id) => Attribute::Id(id.clone()),
            KeyRef::Label(l) => Attribute::Label(l.as_bytes().to_vec()),
        }
    }

    fn describe(&self) -> String {
        match self {
            KeyRef::Id(id) => format!("with id {}", hex(id)),
            KeyRef::Label(l) => format!("labelled '{l}'"),
        }
    }
}

/// Lower-case hex.
pub fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// Hex to bytes; `None` unless every pair is hex.
pub fn unhex(s: &str) -> Option<Vec<u8>> {
    if !s.len().is_multiple_of(2) {
        return None;
    }
    (0..s.len() / 2)
        .map(|i| u8::from_str_radix(s.get(2 * i..2 * i + 2)?, 16).ok())
        .collect()
}

fn spki_from_parts(key_type: KeyType, public_bits: &[u8]) -> Result<Vec<u8>> {
    asn1::spki(key_type.ec_params(), public_bits)
        .map_err(|e| Error::BadTokenData(format!("the {key_type} public key does not encode: {e}")))
}

fn attr_bytes(session: &Session, obj: ObjectHandle, t: AttributeType) -> Result<Option<Vec<u8>>> {
    let attrs = session.get_attributes(obj, &[t])?;
    Ok(attrs.into_iter().find_map(|a| match a {
        Attribute::Id(v)
        | Attribute::Label(v)
        | Attribute::EcParams(v)
        | Attribute::EcPoint(v)
        | Attribute::Modulus(v)
        | Attribute::PublicExponent(v)
        | Attribute::Value(v) => Some(v),
        _ => None,
    }))
}

fn key_type_of(session: &Session, obj: ObjectHandle) -> Result<KeyType> {
    let attrs = session.get_attributes(
        obj,
        &[
            AttributeType::KeyType,
            AttributeType::EcParams,
            AttributeType::Modulus,
        ],
    )?;
    let mut kt = None;
    let mut params = None;
    let mut modulus_len = 0;
    for a in attrs {
        match a {
            Attribute::KeyType(k) => kt = Some(k),
            Attribute::EcParams(p) => params = Some(p),
            Attribute::Modulus(m) => modulus_len = m.iter().skip_while(|b| **b == 0).count(),
            _ => {}
        }
    }
    match (kt, params.as_deref()) {
        (Some(k), Some(P256_PARAMS)) if k == CkKeyType::EC => Ok(KeyType::EcP256),
        (Some(k), Some(P384_PARAMS)) if k == CkKeyType::EC => Ok(KeyType::EcP384),
        (Some(k), _) if k == CkKeyType::RSA && modulus_len == 256 => Ok(KeyType::Rsa2048),
        (Some(k), _) if k == CkKeyType::RSA && modulus_len == 384 => Ok(KeyType::Rsa3072),
        (k, _) => Err(Error::UnknownKeyType(format!(
            "key type {k:?} (only P-256, P-384, RSA-2048, RSA-3072)"
        ))),
    }
}

/// The public half as (subjectPublicKey bits, SPKI) from a public key object.
fn public_parts(session: &Session, public: ObjectHandle, key_type: KeyType) -> Result<Vec<u8>> {
    if key_type.is_ec() {
        let point = attr_bytes(session, public, AttributeType::EcPoint)?
            .ok_or_else(|| Error::BadTokenData("public key has no CKA_EC_POINT".into()))?;
        asn1::ec_point_unwrap(&point, key_type.ec_coord_len()).ok_or_else(|| {
            Error::BadTokenData("CKA_EC_POINT is neither a point nor an OCTET STRING of one".into())
        })
    } else {
        let n = attr_bytes(session, public, AttributeType::Modulus)?
            .ok_or_else(|| Error::BadTokenData("RSA key has no CKA_MODULUS".into()))?;
        let e = attr_bytes(session, public, AttributeType::PublicExponent)?
            .ok_or_else(|| Error::BadTokenData("RSA key has no CKA_PUBLIC_EXPONENT".into()))?;
        asn1::rsa_public_key(&n, &e)
            .map_err(|e| Error::BadTokenData(format!("the RSA public key does not encode: {e}")))
    }
}

/// Every private key the token keeps (token objects, not session objects).
const TOKEN_PRIVATE_KEYS: [Attribute; 2] = [
    Attribute::Class(ObjectClass::PRIVATE_KEY),
    Attribute::Token(true),
];

fn find_one(session: &Session, class: ObjectClass, key: &KeyRef) -> Result<Option<ObjectHandle>> {
    Ok(session
        .find_objects(&[Attribute::Class(class), key.attr(), Attribute::Token(true)])?
        .into_iter()
        .next())
}

/// Find the private key object handle for `id` in this session.
pub(crate) fn private_handle(session: &Session, id: &[u8]) -> Result<ObjectHandle> {
    find_private(session, &KeyRef::Id(id.to_vec()))
}

/// Is `handle` still the token's private key with `id`? Asked of the token itself (one
/// C_GetAttributeValue of CKA_CLASS, CKA_TOKEN and CKA_ID), so a key destroyed since, or a
/// handle the token has handed to another object since, answers no. A handle the token no
/// longer knows is a no, not an error; any other failure is the caller's.
pub(crate) fn is_private_key(session: &Session, handle: ObjectHandle, id: &[u8]) -> Result<bool> {
    use cryptoki::error::{Error as CkError, RvError};
    let asked = [
        AttributeType::Class,
        AttributeType::Token,
        AttributeType::Id,
    ];
    let attrs = match session.get_attributes(handle, &asked) {
        Ok(attrs) => attrs,
        Err(CkError::Pkcs11(RvError::ObjectHandleInvalid | RvError::KeyHandleInvalid, _)) => {
            return Ok(false)
        }
        Err(e) => return Err(e.into()),
    };
    let (mut class, mut token, mut same_id) = (false, false, false);
    for a in attrs {
        match a {
            Attribute::Class(c) => class = c == ObjectClass::PRIVATE_KEY,
            Attribute::Token(t) => token = t,
            Attribute::Id(v) => same_id = v == id,
            _ => {}
        }
    }
    Ok(class && token && same_id)
}

/// Find a private key. Private objects are invisible when the session is not logged in
/// (the token was logged out under us): report that as CKR_USER_NOT_LOGGED_IN so the
/// session pool logs in again, rather than as a missing key.
fn find_private(session: &Session, key: &KeyRef) -> Result<ObjectHandle> {
    if let Some(h) = find_one(session, ObjectClass::PRIVATE_KEY, key)? {
        return Ok(h);
    }
    use cryptoki::session::SessionState;
    match session.get_session_info()?.session_state() {
        SessionState::RoUser | SessionState::RwUser => Err(Error::KeyNotFound(key.describe())),
        _ => Err(cryptoki::error::Error::Pkcs11(
            cryptoki::error::RvError::UserNotLoggedIn,
            cryptoki::context::Function::FindObjects,
        )
        .into()),
    }
}

fn describe_key(session: &Session, private: ObjectHandle) -> Result<KeyInfo> {
    let id = attr_bytes(session, private, AttributeType::Id)?.unwrap_or_default();
    let label = String::from_utf8_lossy(
        &attr_bytes(session, private, AttributeType::Label)?.unwrap_or_default(),
    )
    .into_owned();
    let key_type = key_type_of(session, private)?;
    let kref = KeyRef::Id(id.clone());
    // The public object carries the point; RSA private keys carry the modulus too.
    let public = find_one(session, ObjectClass::PUBLIC_KEY, &kref)?;
    let public_bits = match (public, key_type.is_ec()) {
        (Some(p), _) => public_parts(session, p, key_type)?,
        (None, false) => public_parts(session, private, key_type)?,
        (None, true) => {
            return Err(Error::BadTokenData(format!(
                "EC key {} has no public key object",
                hex(&id)
            )))
        }
    };
    let has_cert = find_one(session, ObjectClass::CERTIFICATE, &kref)?.is_some();
    Ok(KeyInfo {
        spki: spki_from_parts(key_type, &public_bits)?,
        id,
        label,
        key_type,
        public_bits,
        has_cert,
    })
}

impl Token {
    /// Generate a key pair inside the token: private key sensitive, never extractable.
    /// Generation is the last call of its session step, so a session lost afterwards (while
    /// the new key is read back) retries only the reading, never makes a second pair.
    pub fn generate_key(&self, key_type: KeyType, label: &str) -> Result<KeyInfo> {
        self.generate_key_for(key_type, label, false)
    }

    /// [`Token::generate_key`], and with `decrypt` an RSA key that may also decrypt (RSA key
    /// transport: a SCEP answer is encrypted to the requesting key). Never extractable.
    pub fn generate_key_for(
        &self,
        key_type: KeyType,
        label: &str,
        decrypt: bool,
    ) -> Result<KeyInfo> {
        if decrypt && key_type.ec_params().is_some() {
            return Err(Error::InvalidRequest(format!(
                "a {key_type} key cannot decrypt: key transport needs an RSA key"
            )));
        }
        self.mechanisms()?.check_keygen(key_type)?;
        let id = self.with_session(|s| {
            let id = loop {
                let id = s.generate_random_vec(16)?;
                if s.find_objects(&[Attribute::Id(id.clone())])?.is_empty() {
                    break id;
                }
            };
            let common = |extra: Vec<Attribute>| {
                let mut v = vec![
                    Attribute::Token(true),
                    Attribute::Id(id.clone()),
                    Attribute::Label(label.as_bytes().to_vec()),
                ];
                v.extend(extra);
                v
            };
            let private = common(vec![
                Attribute::Private(true),
                Attribute::Sensitive(true),
                Attribute::Extractable(false),
                Attribute::Sign(true),
                Attribute::Decrypt(decrypt),
                Attribute::Derive(false),
            ]);
            let (mech, public) = match key_type.ec_params() {
                Some(params) => (
                    Mechanism::EccKeyPairGen,
                    common(vec![
                        Attribute::Private(false),
                        Attribute::EcParams(params.to_vec()),
                    ]),
                ),
                None => (
                    Mechanism::RsaPkcsKeyPairGen,
                    common(vec![
                        Attribute::Private(false),
                        Attribute::ModulusBits(key_type.modulus_bits().into()),
                        Attribute::PublicExponent(vec![0x01, 0x00, 0x01]),
                    ]),
                ),
            };
            s.generate_key_pair(&mech, &public, &private)?;
            Ok(id)
        })?;
        self.find_key(&KeyRef::Id(id))
    }

    /// Find a key pair by id or label.
    pub fn find_key(&self, key: &KeyRef) -> Result<KeyInfo> {
        self.with_session(|s| {
            let private = find_private(s, key)?;
            describe_key(s, private)
        })
    }

    /// Every private key in the token with its public half.
    pub fn list_keys(&self) -> Result<Vec<KeyInfo>> {
        self.with_session(|s| {
            let mut out = Vec::new();
            for h in s.find_objects(&TOKEN_PRIVATE_KEYS)? {
                match describe_key(s, h) {
                    Ok(k) => out.push(k),
                    // Another program's key of a type we do not use: not ours, left alone.
                    Err(Error::UnknownKeyType(_)) => {}
                    Err(e) => return Err(e),
                }
            }
            Ok(out)
        })
    }

    /// `CKA_ID` and `CKA_LABEL` of every private key, whatever its type: what reconcile
    /// needs, and nothing that can fail on a key another program put in a shared token.
    pub fn list_key_labels(&self) -> Result<Vec<KeyLabel>> {
        self.with_session(|s| {
            let mut out = Vec::new();
            for h in s.find_objects(&TOKEN_PRIVATE_KEYS)? {
                let id = attr_bytes(s, h, AttributeType::Id)?.unwrap_or_default();
                let label = attr_bytes(s, h, AttributeType::Label)?.unwrap_or_default();
                out.push(KeyLabel {
                    id,
                    label: String::from_utf8_lossy(&label).into_owned(),
                });
            }
            Ok(out)
        })
    }

    /// Store an X.509 certificate (DER) under the key's `CKA_ID`, replacing any earlier one.
    pub fn store_cert(&self, id: &[u8], label: &str, cert_der: &[u8]) -> Result<()> {
        use x509_cert::der::{Decode, Encode};
        let cert = x509_cert::Certificate::from_der(cert_der)
            .map_err(|e| Error::BadTokenData(format!("certificate does not parse: {e}")))?;
        let enc = |r: std::result::Result<Vec<u8>, x509_cert::der::Error>| {
            r.map_err(|e| Error::BadTokenData(e.to_string()))
        };
        let subject = enc(cert.tbs_certificate.subject.to_der())?;
        let issuer = enc(cert.tbs_certificate.issuer.to_der())?;
        let serial = enc(cert.tbs_certificate.serial_number.to_der())?;
        self.with_session(|s| {
            for old in s.find_objects(&[
                Attribute::Class(ObjectClass::CERTIFICATE),
                Attribute::Id(id.to_vec()),
            ])? {
                s.destroy_object(old)?;
            }
            s.create_object(&[
                Attribute::Class(ObjectClass::CERTIFICATE),
                Attribute::CertificateType(CertificateType::X_509),
                Attribute::Token(true),
                Attribute::Private(false),
                Attribute::Id(id.to_vec()),
                Attribute::Label(label.as_bytes().to_vec()),
                Attribute::Subject(subject.clone()),
                Attribute::Issuer(issuer.clone()),
                Attribute::SerialNumber(serial.clone()),
                Attribute::Value(cert_der.to_vec()),
            ])?;
            Ok(())
        })
    }

    /// The certificate (DER) stored under `id`, if any.
    pub fn find_cert(&self, id: &[u8]) -> Result<Option<Vec<u8>>> {
        self.with_session(|s| {
            match find_one(s, ObjectClass::CERTIFICATE, &KeyRef::Id(id.to_vec()))? {
                Some(h) => attr_bytes(s, h, AttributeType::Value),
                None => Ok(None),
            }
        })
    }

    /// Set `CKA_LABEL` of every object with this `CKA_ID` (key pair and certificate): how a
    /// key that took over a role (an ACME account key after a rollover) gets the role's
    /// label.
    pub fn relabel(&self, id: &[u8], label: &str) -> Result<usize> {
        self.with_session(|s| {
            let objs = s.find_objects(&[Attribute::Id(id.to_vec())])?;
            if objs.is_empty() {
                return Err(Error::KeyNotFound(format!("with id {}", hex(id))));
            }
            for o in &objs {
                s.update_attributes(*o, &[Attribute::Label(label.as_bytes().to_vec())])?;
            }
            Ok(objs.len())
        })
    }

    /// Destroy private key, public key and certificate objects with this `CKA_ID`, then
    /// prove by a fresh search that nothing with the id is left. Returns how many objects
    /// went. No signature made after this returns uses the key: every signature looks its
    /// key up by id first ([`crate::TokenKey`]).
    pub fn destroy(&self, id: &[u8]) -> Result<usize> {
        self.with_session(|s| {
            let objs = s.find_objects(&[Attribute::Id(id.to_vec())])?;
            if objs.is_empty() {
                return Err(Error::KeyNotFound(format!("with id {}", hex(id))));
            }
            for o in &objs {
                s.destroy_object(*o)?;
            }
            let left = s.find_objects(&[Attribute::Id(id.to_vec())])?.len();
            if left != 0 {
                return Err(Error::DestroyIncomplete(left));
            }
            Ok(objs.len())
        })
    }
}
