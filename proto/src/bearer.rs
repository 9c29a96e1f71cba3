//! `authorization: Bearer <token>` on the calls of every lifl gRPC client:
//! `liflctl`, the trainer client, the node agent, the top aggregator.

use tonic::metadata::{Ascii, MetadataValue};
use tonic::service::Interceptor;
use tonic::{Request, Status};

/// A token an HTTP header cannot carry (not printable ASCII).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("the token must be printable ASCII")]
pub struct InvalidToken;

/// Adds the bearer header to every call it intercepts; adds nothing without
/// a token. Its `Debug` never shows the token.
#[derive(Clone, Default)]
pub struct Bearer(Option<MetadataValue<Ascii>>);

impl Bearer {
    /// A bearer for `token`; none (no header) for `None` or an empty token.
    pub fn new(token: Option<&str>) -> Result<Self, InvalidToken> {
        let Some(token) = token.filter(|t| !t.is_empty()) else {
            return Ok(Self(None));
        };
        let value = format!("Bearer {token}")
            .parse()
            .map_err(|_| InvalidToken)?;
        Ok(Self(Some(value)))
    }

    /// `message` as a request carrying the header.
    pub fn request<T>(&self, message: T) -> Request<T> {
        let mut request = Request::new(message);
        if let Some(value) = &self.0 {
            request
                .metadata_mut()
                .insert("authorization", value.clone());
        }
        request
    }
}

impl std::fmt::Debug for Bearer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let shown = if self.0.is_some() { "<token>" } else { "none" };
        f.debug_tuple("Bearer").field(&shown).finish()
    }
}

impl Interceptor for Bearer {
    fn call(&mut self, mut request: Request<()>) -> Result<Request<()>, Status> {
        if let Some(value) = &self.0 {
            request
                .metadata_mut()
                .insert("authorization", value.clone());
        }
        Ok(request)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_header_carries_the_token_and_debug_hides_it() {
        let bearer = Bearer::new(Some("s3cret")).unwrap();
        let request = bearer.request(());
        assert_eq!(
            request.metadata().get("authorization").unwrap(),
            "Bearer s3cret"
        );
        assert!(!format!("{bearer:?}").contains("s3cret"));
        assert!(Bearer::new(Some(""))
            .unwrap()
            .request(())
            .metadata()
            .is_empty());
        assert_eq!(Bearer::new(Some("bad\ntoken")).unwrap_err(), InvalidToken);
    }
}
