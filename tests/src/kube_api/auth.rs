//! Who a request is: a client certificate the client CA signed (checked first,
//! as kube-apiserver's x509 authenticator runs before its token ones; see
//! `client_pki`), else a bearer token a test registered. A token a test expired
//! authenticates no more, here or in a TokenReview. What a user may do is
//! `rbac`'s.

use std::collections::HashMap;

use axum::http::{HeaderMap, header};

use super::objects::fresh_uid;
use super::rbac::Rbac;
use super::request_info::RequestInfo;

/// Every authenticated user is in this group, as in Kubernetes.
pub const AUTHENTICATED_GROUP: &str = "system:authenticated";
/// A TokenReview's `status.error` for a token the fake does not know. The
/// apiserver's service-account authenticator says this of a token that is no
/// JWT (the union of authenticators prefixes its own error).
pub const UNKNOWN_TOKEN_ERROR: &str =
    "[invalid bearer token, square/go-jose: compact JWS format must have three parts]";
/// A TokenReview's `status.error` for a token a test expired, as the apiserver
/// says it of an expired service-account token.
pub const EXPIRED_TOKEN_ERROR: &str = "[invalid bearer token, service account token has expired]";

/// An authenticated user, as a TokenReview's `status.user` and a
/// SubjectAccessReview's spec name one.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Identity {
    pub name: String,
    /// Empty for certificate users: a certificate carries no uid.
    pub uid: String,
    /// Always ends with [`AUTHENTICATED_GROUP`].
    pub groups: Vec<String>,
}

impl Identity {
    pub fn new(name: String, uid: String, groups: impl IntoIterator<Item = String>) -> Identity {
        let mut groups: Vec<String> = groups
            .into_iter()
            .filter(|g| g != AUTHENTICATED_GROUP)
            .collect();
        groups.push(AUTHENTICATED_GROUP.to_string());
        Identity { name, uid, groups }
    }
}

/// Why a token does not authenticate.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum TokenError {
    Unknown,
    Expired,
}

impl TokenError {
    /// What a TokenReview says in `status.error`.
    pub fn message(self) -> &'static str {
        match self {
            TokenError::Unknown => UNKNOWN_TOKEN_ERROR,
            TokenError::Expired => EXPIRED_TOKEN_ERROR,
        }
    }
}

struct TokenUser {
    identity: Identity,
    expired: bool,
}

#[derive(Default)]
pub(super) struct Policy {
    /// token -> user
    tokens: HashMap<String, TokenUser>,
    /// user name -> uid: one user behind several tokens is one uid.
    uids: HashMap<String, String>,
    pub rbac: Rbac,
}

impl Policy {
    /// `groups` besides [`AUTHENTICATED_GROUP`], which every user has.
    pub fn add_user(&mut self, token: &str, user: &str, groups: &[&str]) {
        let uid = self
            .uids
            .entry(user.to_string())
            .or_insert_with(fresh_uid)
            .clone();
        let identity = Identity::new(user.to_string(), uid, groups.iter().map(|g| g.to_string()));
        self.tokens.insert(
            token.to_string(),
            TokenUser {
                identity,
                expired: false,
            },
        );
    }

    /// `false` if no user has this token.
    pub fn expire_token(&mut self, token: &str) -> bool {
        self.tokens
            .get_mut(token)
            .map(|user| user.expired = true)
            .is_some()
    }

    /// What both a request's `Authorization: Bearer` and a TokenReview ask.
    pub fn review_token(&self, token: &str) -> Result<Identity, TokenError> {
        match self.tokens.get(token) {
            None => Err(TokenError::Unknown),
            Some(user) if user.expired => Err(TokenError::Expired),
            Some(user) => Ok(user.identity.clone()),
        }
    }

    /// The user of a request: the verified client certificate's (`x509`), else
    /// the bearer token's. `None` means 401: a credential the apiserver does
    /// not accept never falls back to anonymous.
    pub fn authenticate(&self, headers: &HeaderMap, x509: Option<Identity>) -> Option<Identity> {
        if x509.is_some() {
            return x509;
        }
        let value = headers.get(header::AUTHORIZATION)?.to_str().ok()?;
        let (scheme, token) = value.split_once(' ')?;
        if !scheme.eq_ignore_ascii_case("bearer") {
            return None;
        }
        self.review_token(token.trim()).ok()
    }

    /// `Err(reason)` carries the authorizer's text for the forbidden message.
    pub fn authorize(&self, user: &Identity, verb: &str, info: &RequestInfo) -> Result<(), String> {
        if self
            .rbac
            .decide(&user.name, &user.groups, verb, info)
            .allowed
        {
            return Ok(());
        }
        // apiserver's `forbiddenMessage`.
        let scope = if info.namespace.is_empty() {
            "at the cluster scope".to_string()
        } else {
            format!("in the namespace \"{}\"", info.namespace)
        };
        Err(format!(
            "User \"{}\" cannot {verb} resource \"{}\" in API group \"{}\" {scope}",
            user.name,
            info.resource_path(),
            info.group
        ))
    }
}
