//! The join token format shared by the server (which mints tokens) and the agent (which uses them):
//! `<bearer>::sha256:<hex SHA-256 of the CA certificate PEM>`, the k3s scheme. The hash lets a new
//! node check the CA it fetches over an unverified connection before trusting anything.

/// Separates the bearer token from the CA hash.
pub const CA_HASH_SEPARATOR: &str = "::sha256:";

/// A join token from a bearer token and the CA's hash.
pub fn compose(bearer: &str, ca_sha256: &str) -> String {
    format!("{bearer}{CA_HASH_SEPARATOR}{ca_sha256}")
}

/// The bearer token and the CA hash of a join token; None when it is not one.
pub fn split(token: &str) -> Option<(&str, &str)> {
    token
        .split_once(CA_HASH_SEPARATOR)
        .filter(|(bearer, hash)| !bearer.is_empty() && !hash.is_empty())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_malformed_tokens() {
        let token = compose("flt.a.b", "00ff");
        assert_eq!(split(&token), Some(("flt.a.b", "00ff")));
        assert_eq!(split("flt.a.b"), None);
        assert_eq!(split("::sha256:00ff"), None);
    }
}
