//! Bearer tokens: the admin token an operator configures, and the trainer
//! tokens the control plane mints per job.
//!
//! Only SHA-256 hashes of tokens are kept, in memory and in the store, so a
//! leaked store file does not leak working tokens. Auth is on exactly when an
//! admin token is configured; without one every call is allowed, which suits a
//! loopback development server and nothing else.
//!
//! LIMITATION: the server speaks plaintext gRPC, so bearer tokens cross the
//! network in the clear, and sidecars authenticate with the admin token (there
//! are no per-node tokens), so any sidecar can also manage jobs. Nobody
//! notices until a token is sniffed or a node misbehaves; it is acceptable on
//! a trusted cluster network while the data plane is built. tonic TLS
//! (`tls-ring`) and node-scoped tokens minted at registration would fix it.

use std::fmt;

use sha2::{Digest, Sha256};

/// SHA-256 of a token.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct TokenHash([u8; 32]);

impl TokenHash {
    /// Hashes a presented or configured token.
    pub fn of(token: &str) -> Self {
        Self(Sha256::digest(token.as_bytes()).into())
    }

    /// Lowercase hex, as stored.
    pub fn to_hex(self) -> String {
        self.0.iter().map(|b| format!("{b:02x}")).collect()
    }

    /// Parses lowercase or uppercase hex; `None` if it is not 64 hex digits.
    pub fn from_hex(hex: &str) -> Option<Self> {
        if hex.len() != 64 {
            return None;
        }
        let mut bytes = [0u8; 32];
        for (i, byte) in bytes.iter_mut().enumerate() {
            *byte = u8::from_str_radix(hex.get(2 * i..2 * i + 2)?, 16).ok()?;
        }
        Some(Self(bytes))
    }
}

impl fmt::Debug for TokenHash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // A hash is not secret, but a prefix is enough to tell two apart.
        write!(f, "TokenHash({}..)", &self.to_hex()[..8])
    }
}

/// Why a call was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AuthError {
    /// No bearer token came with the call.
    #[error("missing bearer token")]
    Missing,
    /// The token is not one the control plane issued or was configured with.
    #[error("invalid bearer token")]
    Invalid,
    /// A trainer token of another job, or one used for an admin call.
    #[error("token is not allowed to act on {scope}")]
    OutOfScope {
        /// What the call needed, such as `job 3` or `admin calls`.
        scope: String,
    },
}

/// Whether auth is on, and the admin token's hash.
#[derive(Debug, Clone, Default)]
pub struct Auth {
    admin: Option<TokenHash>,
}

impl Auth {
    /// Auth with this admin token, or off if `None`.
    pub fn new(admin_token: Option<&str>) -> Self {
        Self {
            admin: admin_token.map(TokenHash::of),
        }
    }

    /// Whether calls must carry a token.
    pub fn is_enabled(&self) -> bool {
        self.admin.is_some()
    }

    /// Whether `token` is the admin token, or auth is off.
    pub fn is_admin(&self, token: Option<&str>) -> bool {
        match (self.admin, token) {
            (None, _) => true,
            (Some(admin), Some(token)) => TokenHash::of(token) == admin,
            (Some(_), None) => false,
        }
    }
}

/// A fresh random token: 192 bits from the operating system, in hex.
pub fn mint_token() -> Result<String, getrandom::Error> {
    let mut bytes = [0u8; 24];
    getrandom::fill(&mut bytes)?;
    Ok(format!(
        "lifl_{}",
        bytes.iter().map(|b| format!("{b:02x}")).collect::<String>()
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn admin_token_is_checked_only_when_configured() {
        let off = Auth::new(None);
        assert!(!off.is_enabled() && off.is_admin(None) && off.is_admin(Some("x")));
        let on = Auth::new(Some("s3cret"));
        assert!(on.is_enabled());
        assert!(on.is_admin(Some("s3cret")));
        assert!(!on.is_admin(Some("s3cret ")));
        assert!(!on.is_admin(None));
    }

    #[test]
    fn token_hash_round_trips_through_hex() {
        let hash = TokenHash::of("abc");
        assert_eq!(
            hash.to_hex(),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
        assert_eq!(TokenHash::from_hex(&hash.to_hex()), Some(hash));
        assert_eq!(TokenHash::from_hex("zz"), None);
    }

    #[test]
    fn minted_tokens_differ() {
        let (a, b) = (mint_token().unwrap(), mint_token().unwrap());
        assert_ne!(a, b);
        assert_eq!(a.len(), "lifl_".len() + 48);
    }
}
