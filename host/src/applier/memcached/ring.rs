//! Which server of a Memcached pool holds a key: the ketama consistent hash of libketama (and
//! libmemcached's `MEMCACHED_BEHAVIOR_KETAMA` with equal weights), so that other ketama clients
//! given the same server names find the same keys.
//!
//! Each server gets 160 points on a ring of `u32`: for `n` in `0..40`, the MD5 digest of
//! `"<host:port>-<n>"` gives four points, each four of its bytes read little-endian. A key goes
//! to the first point at or after the little-endian `u32` of its own MD5 digest's first four
//! bytes, wrapping around to the lowest point. Removing a server moves only its keys.

use md5::{Digest as _, Md5};

/// Points per server digest and digests per server.
const POINTS_PER_DIGEST: usize = 4;
const DIGESTS_PER_SERVER: usize = 40;

/// The ring of a pool's servers.
pub(crate) struct Ring {
    /// Points in ascending order, each with the index of its server.
    points: Vec<(u32, usize)>,
}

impl Ring {
    /// The ring of `servers` (as configured: `host:port`).
    pub(crate) fn new(servers: &[String]) -> Ring {
        let mut points = Vec::with_capacity(servers.len() * DIGESTS_PER_SERVER * POINTS_PER_DIGEST);
        for (index, server) in servers.iter().enumerate() {
            for n in 0..DIGESTS_PER_SERVER {
                let digest = Md5::digest(format!("{server}-{n}").as_bytes());
                for chunk in digest.chunks_exact(4).take(POINTS_PER_DIGEST) {
                    let point = u32::from_le_bytes([chunk[0], chunk[1], chunk[2], chunk[3]]);
                    points.push((point, index));
                }
            }
        }
        points.sort_unstable();
        Ring { points }
    }

    /// The index of the server that holds `key`.
    pub(crate) fn server(&self, key: &str) -> usize {
        if self.points.len() <= DIGESTS_PER_SERVER * POINTS_PER_DIGEST {
            return 0;
        }
        let digest = Md5::digest(key.as_bytes());
        let hash = u32::from_le_bytes([digest[0], digest[1], digest[2], digest[3]]);
        let at = self.points.partition_point(|(point, _)| *point < hash);
        self.points.get(at).unwrap_or(&self.points[0]).1
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names(n: usize) -> Vec<String> {
        (0..n).map(|i| format!("10.0.0.{i}:11211")).collect()
    }

    #[test]
    fn keys_spread_and_removing_a_server_moves_only_its_keys() {
        let three = Ring::new(&names(3));
        let two = Ring::new(&names(2));
        let keys: Vec<String> = (0..3000).map(|i| format!("users:{i}")).collect();
        let mut per_server = [0; 3];
        for key in &keys {
            let server = three.server(key);
            per_server[server] += 1;
            if server < 2 {
                assert_eq!(two.server(key), server, "{key} moved");
            }
        }
        assert!(per_server.iter().all(|n| *n > 600), "{per_server:?}");
        assert_eq!(Ring::new(&names(1)).server("any"), 0);
    }

    #[test]
    fn the_point_after_the_last_wraps_to_the_first() {
        let ring = Ring::new(&names(2));
        let (first, last) = (ring.points[0], ring.points[ring.points.len() - 1]);
        let find = |hash: u32| {
            let at = ring.points.partition_point(|(p, _)| *p < hash);
            ring.points.get(at).unwrap_or(&ring.points[0]).1
        };
        assert_eq!(find(last.0.saturating_add(1)), first.1);
        assert_eq!(find(0), first.1);
    }
}
