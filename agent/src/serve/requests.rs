//! The bodies callers send to the signing API, parsed and checked before anything reaches
//! the token. Never panics on any input (property tests here, a fuzz target in fuzz/).

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine as _;
use hsm_shim::{Hash, SignAlg};

/// `POST /v1/identities/{name}/sign`: `{"alg": "ES256", "data": BASE64}` or
/// `{"alg": "PS256", "digest": BASE64}`; ECDSA signatures DER unless `"format": "raw"`.
#[derive(Debug, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SignRequest {
    alg: String,
    data: Option<String>,
    digest: Option<String>,
    #[serde(default)]
    format: Option<String>,
}

/// A checked signature request.
#[derive(Debug)]
pub struct SignJob {
    /// Algorithm.
    pub alg: SignAlg,
    /// The data, or the digest when `prehashed`.
    pub bytes: Vec<u8>,
    /// `bytes` is a digest.
    pub prehashed: bool,
}

fn sign_alg(name: &str, raw: bool) -> Option<SignAlg> {
    let ec = |hash| SignAlg::Ecdsa { hash, der: !raw };
    Some(match name {
        "ES256" => ec(Hash::Sha256),
        "ES384" => ec(Hash::Sha384),
        "ES512" => ec(Hash::Sha512),
        "RS256" => SignAlg::RsaPkcs1(Hash::Sha256),
        "RS384" => SignAlg::RsaPkcs1(Hash::Sha384),
        "RS512" => SignAlg::RsaPkcs1(Hash::Sha512),
        "PS256" => SignAlg::RsaPss(Hash::Sha256),
        "PS384" => SignAlg::RsaPss(Hash::Sha384),
        "PS512" => SignAlg::RsaPss(Hash::Sha512),
        _ => return None,
    })
}

impl SignRequest {
    /// The algorithm as asked.
    pub fn alg_name(&self) -> &str {
        &self.alg
    }

    /// Check the request: a known algorithm and format, exactly one of data or digest, base64.
    pub fn check(self) -> Result<SignJob, String> {
        let raw = match self.format.as_deref() {
            None | Some("der") => false,
            Some("raw") => true,
            Some(f) => return Err(format!("format '{f}': use der or raw")),
        };
        let alg = sign_alg(&self.alg, raw).ok_or_else(|| {
            format!(
                "alg '{}': use ES256/ES384/ES512, RS256/RS384/RS512 or PS256/PS384/PS512",
                self.alg
            )
        })?;
        let (input, prehashed) = match (self.data, self.digest) {
            (Some(d), None) => (d, false),
            (None, Some(d)) => (d, true),
            _ => return Err("give exactly one of data or digest (base64)".into()),
        };
        let bytes = B64
            .decode(input.as_bytes())
            .map_err(|e| format!("not base64: {e}"))?;
        Ok(SignJob {
            alg,
            bytes,
            prehashed,
        })
    }
}

/// `POST /v1/identities/{name}/jws`: `{"payload": <JSON value>}` or `{"payload_b64":
/// BASE64}` (any bytes), optional `"kid"` (default: the credential's kid, else the
/// certificate's SHA-256 fingerprint) → compact JWS.
#[derive(Debug, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct JwsRequest {
    payload: Option<serde_json::Value>,
    payload_b64: Option<String>,
    /// The `kid` header.
    pub kid: Option<String>,
}

impl JwsRequest {
    /// The payload bytes.
    pub fn payload(&self) -> Result<Vec<u8>, String> {
        match (&self.payload, &self.payload_b64) {
            (Some(v), None) => serde_json::to_vec(v).map_err(|e| e.to_string()),
            (None, Some(b)) => B64
                .decode(b.as_bytes())
                .map_err(|e| format!("payload_b64 is not base64: {e}")),
            _ => Err("give exactly one of payload (JSON) or payload_b64".into()),
        }
    }
}

/// The top-level members of a JWK rotation API's rotate-to request. A JWS over a payload
/// that has one of them, in any case, would move the credential to a key of the caller's.
const ROTATION_MEMBERS: [&str; 3] = ["publickey", "expiration", "currentkeyexpiry"];

/// For an API credential's key: the payload must be a JSON document (what the rotation API
/// parses) with none of a rotation request's top-level members.
pub fn not_a_rotation_request(payload: &[u8]) -> Result<(), String> {
    let v: serde_json::Value = serde_json::from_slice(payload).map_err(|_| {
        "its JWS payloads must be JSON documents (this one is not), so that a rotation request cannot hide in one".to_owned()
    })?;
    if let Some(member) = v.as_object().and_then(|o| {
        o.keys()
            .find(|k| ROTATION_MEMBERS.contains(&k.to_ascii_lowercase().as_str()))
    }) {
        return Err(format!(
            "the payload has a top-level '{member}' member, the shape of a rotate-to request, which only the agent itself may sign"
        ));
    }
    Ok(())
}

/// Parse and check a request body as the API would (for the fuzz target and tests).
pub fn parse(kind: &str, body: &[u8]) -> Result<(), String> {
    match kind {
        "rotation" => not_a_rotation_request(body),
        "sign" => serde_json::from_slice::<SignRequest>(body)
            .map_err(|e| e.to_string())?
            .check()
            .map(|_| ()),
        _ => serde_json::from_slice::<JwsRequest>(body)
            .map_err(|e| e.to_string())?
            .payload()
            .map(|_| ()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn good_and_bad_sign_requests() {
        let ok = parse("sign", br#"{"alg":"ES256","data":"aGk="}"#);
        assert!(ok.is_ok(), "{ok:?}");
        for (body, why) in [
            (&br#"{"alg":"HS256","data":"aGk="}"#[..], "alg 'HS256'"),
            (br#"{"alg":"ES256"}"#, "exactly one of data or digest"),
            (br#"{"alg":"ES256","data":"%%"}"#, "not base64"),
            (
                br#"{"alg":"ES256","data":"aGk=","format":"pem"}"#,
                "format 'pem'",
            ),
            (
                br#"{"alg":"ES256","data":"aGk=","extra":1}"#,
                "unknown field",
            ),
        ] {
            let e = parse("sign", body).unwrap_err();
            assert!(e.contains(why), "{e}");
        }
        assert!(parse("jws", br#"{"payload":{"a":1}}"#).is_ok());
        assert!(parse("jws", br#"{"payload":1,"payload_b64":"aGk="}"#).is_err());
    }

    #[test]
    fn rotation_shaped_payloads_are_refused_in_any_case() {
        for body in [
            &br#"{"PublicKey":{"kty":"EC"}}"#[..],
            br#"{"publickey":1}"#,
            br#"{"a":1,"EXPIRATION":"2027-01-01"}"#,
            br#"{"CurrentKeyExpiry":"x"}"#,
            br#"{"\u0050ublicKey":{}}"#,
            br#"not json"#,
        ] {
            assert!(
                not_a_rotation_request(body).is_err(),
                "{}",
                String::from_utf8_lossy(body)
            );
        }
        assert!(not_a_rotation_request(br#"{"order":1,"nested":{"PublicKey":1}}"#).is_ok());
        assert!(not_a_rotation_request(b"[1,2]").is_ok());
    }

    proptest! {
        #[test]
        fn request_parsers_never_panic(body in proptest::collection::vec(any::<u8>(), 0..400)) {
            let _ = parse("sign", &body);
            let _ = parse("jws", &body);
            let _ = parse("rotation", &body);
        }

        #[test]
        fn near_valid_sign_requests_never_panic(alg in "[A-Z]{2}[0-9]{3}", data in "[A-Za-z0-9+/=%]{0,40}") {
            let body = format!(r#"{{"alg":"{alg}","data":"{data}"}}"#);
            let _ = parse("sign", body.as_bytes());
        }
    }
}
