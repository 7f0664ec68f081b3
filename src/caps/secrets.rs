//! Encryption of tenant secrets at rest: ChaCha20-Poly1305 with the operator's key, a fresh
//! random nonce per value, and the tenant and name bound in as associated data so a value
//! copied to another row does not decrypt.

use anyhow::{bail, Context};
use base64::Engine as _;
use chacha20poly1305::aead::{Aead, KeyInit, Payload};
use chacha20poly1305::{ChaCha20Poly1305, Key, Nonce};
use sha2::Digest;

use super::SecretsConfig;

/// A sealed secret as stored.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Sealed {
    /// Which key sealed it: the first 8 bytes of the key's SHA-256, hex.
    pub key_id: String,
    /// The random 12-byte nonce it was sealed with.
    pub nonce: Vec<u8>,
    /// The encrypted value with its authentication tag.
    pub ciphertext: Vec<u8>,
}

pub struct SecretBox {
    cipher: ChaCha20Poly1305,
    key_id: String,
}

impl SecretBox {
    /// The key from the configuration; `None` when none is configured.
    pub fn from_config(config: &SecretsConfig) -> anyhow::Result<Option<SecretBox>> {
        let text = if !config.key.is_empty() {
            config.key.clone()
        } else if !config.key_file.is_empty() {
            std::fs::read_to_string(&config.key_file).with_context(|| {
                format!("reading capabilities.secrets.key_file {}", config.key_file)
            })?
        } else {
            return Ok(None);
        };
        let key = base64::engine::general_purpose::STANDARD
            .decode(text.trim())
            .context("the secrets key is not base64")?;
        Ok(Some(SecretBox::new(&key)?))
    }

    pub fn new(key: &[u8]) -> anyhow::Result<SecretBox> {
        if key.len() != 32 {
            bail!(
                "the secrets key must be 32 bytes (base64 of `head -c 32 /dev/urandom`), not {}",
                key.len()
            );
        }
        let key_id = hex::encode(&sha2::Sha256::digest(key)[..8]);
        Ok(SecretBox {
            cipher: ChaCha20Poly1305::new(Key::from_slice(key)),
            key_id,
        })
    }

    /// A new random key, base64.
    pub fn generate_key() -> String {
        base64::engine::general_purpose::STANDARD.encode(rand::random::<[u8; 32]>())
    }

    pub fn key_id(&self) -> &str {
        &self.key_id
    }

    pub fn seal(&self, tenant: &str, name: &str, value: &str) -> Sealed {
        let nonce = rand::random::<[u8; 12]>();
        let ciphertext = self
            .cipher
            .encrypt(
                Nonce::from_slice(&nonce),
                Payload {
                    msg: value.as_bytes(),
                    aad: &aad(tenant, name),
                },
            )
            .expect("encryption of an in-memory value does not fail");
        Sealed {
            key_id: self.key_id.clone(),
            nonce: nonce.to_vec(),
            ciphertext,
        }
    }

    pub fn open(&self, tenant: &str, name: &str, sealed: &Sealed) -> anyhow::Result<String> {
        if sealed.key_id != self.key_id {
            bail!(
                "secret {name:?} was encrypted with key {} but the configured key is {}",
                sealed.key_id,
                self.key_id
            );
        }
        if sealed.nonce.len() != 12 {
            bail!("secret {name:?} is damaged (bad nonce)");
        }
        let plain = self
            .cipher
            .decrypt(
                Nonce::from_slice(&sealed.nonce),
                Payload {
                    msg: &sealed.ciphertext,
                    aad: &aad(tenant, name),
                },
            )
            .map_err(|_| {
                anyhow::anyhow!(
                    "secret {name:?} does not decrypt for tenant {tenant:?}: it was damaged, or \
                     copied from another tenant or name (set it again with `scriptd secrets set`)"
                )
            })?;
        String::from_utf8(plain).context("secret is not UTF-8")
    }
}

fn aad(tenant: &str, name: &str) -> Vec<u8> {
    format!("scriptd-secret\0{tenant}\0{name}").into_bytes()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn values_round_trip_and_stay_bound_to_their_row() {
        let b = SecretBox::new(&[7; 32]).unwrap();
        let sealed = b.seal("acme", "api-key", "s3cr3t");
        assert!(!sealed
            .ciphertext
            .windows(6)
            .any(|w| w == b"s3cr3t".as_slice()));
        assert_eq!(b.open("acme", "api-key", &sealed).unwrap(), "s3cr3t");
        assert!(b.open("other", "api-key", &sealed).is_err());
        assert!(b.open("acme", "other", &sealed).is_err());
        let again = b.seal("acme", "api-key", "s3cr3t");
        assert_ne!(again.nonce, sealed.nonce);
    }

    #[test]
    fn a_different_key_is_named_not_garbled() {
        let a = SecretBox::new(&[1; 32]).unwrap();
        let b = SecretBox::new(&[2; 32]).unwrap();
        let err = b.open("t", "n", &a.seal("t", "n", "v")).unwrap_err();
        assert!(err.to_string().contains(a.key_id()), "{err}");
        assert!(SecretBox::new(&[0; 16]).is_err());
    }
}
