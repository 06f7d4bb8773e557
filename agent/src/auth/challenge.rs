//! Challenges for certificate users to sign: issued-at seconds, random
//! bytes, and the agent's MAC over both. The agent keeps no state per
//! challenge, so asking for challenges costs it nothing; the key lives only
//! in this process, so challenges cannot be forged and an earlier agent's
//! are void.
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use ring::{hmac, rand::SecureRandom as _};
use tonic::Status;

/// A challenge is good for this long after the agent issued it; the client
/// signs a new one well before (see the client's credentials).
pub const LIFETIME: Duration = Duration::from_secs(10 * 60);
const ISSUED: usize = 8;
const NONCE: usize = 16;
const MAC: usize = 32;
const LEN: usize = ISSUED + NONCE + MAC;

pub struct Challenges {
    key: hmac::Key,
    rng: ring::rand::SystemRandom,
}

impl Challenges {
    pub fn new() -> Self {
        let rng = ring::rand::SystemRandom::new();
        let key = hmac::Key::generate(hmac::HMAC_SHA256, &rng).expect("the OS random generator");
        Self { key, rng }
    }

    pub fn issue(&self) -> Option<Vec<u8>> {
        self.issue_at(unix_now())
    }

    fn issue_at(&self, now: u64) -> Option<Vec<u8>> {
        let mut challenge = vec![0; ISSUED + NONCE];
        challenge[..ISSUED].copy_from_slice(&now.to_be_bytes());
        self.rng.fill(&mut challenge[ISSUED..]).ok()?;
        let tag = hmac::sign(&self.key, &challenge);
        challenge.extend_from_slice(tag.as_ref());
        Some(challenge)
    }

    /// How much longer `challenge` is good for, if this agent issued it and
    /// it has not expired.
    pub fn check(&self, challenge: &[u8]) -> Result<Duration, Status> {
        let stale = || {
            Status::unauthenticated(
                "the signed challenge is not one of this agent's current challenges: sign a new one",
            )
        };
        if challenge.len() != LEN {
            return Err(stale());
        }
        let (signed, tag) = challenge.split_at(ISSUED + NONCE);
        hmac::verify(&self.key, signed, tag).map_err(|_| stale())?;
        let issued = u64::from_be_bytes(signed[..ISSUED].try_into().expect("8 bytes"));
        // A clock stepped back makes a challenge look younger, never a panic.
        let age = Duration::from_secs(unix_now().saturating_sub(issued));
        LIFETIME.checked_sub(age).ok_or_else(stale)
    }
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |since| since.as_secs())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_this_agents_fresh_challenges_pass() {
        let challenges = Challenges::new();
        let fresh = challenges.issue().unwrap();
        assert!(challenges.check(&fresh).unwrap() > LIFETIME - Duration::from_secs(5));

        let mut forged = fresh.clone();
        forged[ISSUED] ^= 1;
        assert!(challenges.check(&forged).is_err(), "a changed nonce");
        let mut younger = fresh.clone();
        younger[ISSUED - 1] ^= 1;
        assert!(challenges.check(&younger).is_err(), "a changed issue time");
        assert!(challenges.check(&fresh[..LEN - 1]).is_err(), "cut short");

        let earlier_agent = Challenges::new();
        assert!(
            challenges.check(&earlier_agent.issue().unwrap()).is_err(),
            "another agent process's challenge"
        );

        let old = challenges
            .issue_at(unix_now() - LIFETIME.as_secs() - 1)
            .unwrap();
        assert!(challenges.check(&old).is_err(), "expired");
    }
}
