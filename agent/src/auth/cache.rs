//! Verdicts on credentials, kept briefly so that a session's many calls (one
//! per stolen connection) cost the API server one review, not one each.
//! Keys are SHA-256 digests: the agent never keeps a caller's token.
use std::{
    collections::HashMap,
    sync::Mutex,
    time::{Duration, Instant},
};

use ring::digest;

/// Entries kept at most. A caller sending endless distinct credentials only
/// evicts earlier verdicts (which are then asked again), never grows memory:
/// 4096 × (32-byte key + a verdict: a user's name, uid and groups, a few
/// hundred bytes, a few KiB for an OIDC user in many groups) ≤ about 16 MiB.
pub const MAX_ENTRIES: usize = 4096;

pub struct VerdictCache<T> {
    entries: Mutex<HashMap<[u8; 32], (Instant, T)>>,
}

impl<T> Default for VerdictCache<T> {
    fn default() -> Self {
        Self {
            entries: Mutex::default(),
        }
    }
}

/// A credential's cache key: its SHA-256.
pub fn key(credential: &[u8]) -> [u8; 32] {
    let digest = digest::digest(&digest::SHA256, credential);
    let mut key = [0; 32];
    key.copy_from_slice(digest.as_ref());
    key
}

impl<T: Clone> VerdictCache<T> {
    /// The verdict, while it has not expired.
    pub fn get(&self, key: &[u8; 32]) -> Option<T> {
        self.get_with_time_left(key).map(|(verdict, _)| verdict)
    }

    /// The verdict and how much longer it holds.
    pub fn get_with_time_left(&self, key: &[u8; 32]) -> Option<(T, Duration)> {
        let entries = self.entries.lock().expect("verdict cache lock");
        let (until, verdict) = entries.get(key)?;
        let left = until.checked_duration_since(Instant::now())?;
        (!left.is_zero()).then(|| (verdict.clone(), left))
    }

    pub fn put(&self, key: [u8; 32], verdict: T, lifetime: Duration) {
        let now = Instant::now();
        let mut entries = self.entries.lock().expect("verdict cache lock");
        if entries.len() >= MAX_ENTRIES {
            entries.retain(|_, (until, _)| *until > now);
        }
        if entries.len() >= MAX_ENTRIES
            && let Some(soonest) = entries
                .iter()
                .min_by_key(|(_, (until, _))| *until)
                .map(|(key, _)| *key)
        {
            entries.remove(&soonest);
        }
        entries.insert(key, (now + lifetime, verdict));
    }

    #[cfg(test)]
    pub fn len(&self) -> usize {
        self.entries.lock().expect("verdict cache lock").len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn verdicts_expire_and_the_cache_stays_bounded() {
        let cache = VerdictCache::default();
        let token = key(b"token");
        cache.put(token, 7, Duration::from_secs(60));
        assert_eq!(cache.get(&token), Some(7));
        let (_, left) = cache.get_with_time_left(&token).unwrap();
        assert!(left > Duration::from_secs(59) && left <= Duration::from_secs(60));
        cache.put(token, 8, Duration::ZERO);
        assert_eq!(cache.get(&token), None, "expired");
        for n in 0..(MAX_ENTRIES as u32 + 100) {
            cache.put(key(&n.to_be_bytes()), n, Duration::from_secs(60));
        }
        assert_eq!(cache.len(), MAX_ENTRIES);
    }
}
