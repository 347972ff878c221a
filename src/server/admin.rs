//! The operator's view, `GET /admin/environments`: which environments have subscribers on this
//! instance, largest first, with their newest known update time.
//!
//! It walks every known environment once (O(n)); only the largest [`MAX_LISTED`] are sorted,
//! after a partial selection, so an instance with many environments pays O(n + k log k) on the
//! loop for one scrape, not a full sort.

use super::*;
use std::io::Write;

/// Most environments listed in one answer; the totals count them all.
pub(super) const MAX_LISTED: usize = 1_000;

impl Server {
    /// The JSON body of `/admin/environments`:
    /// `{"environments_with_subscribers": n, "subscribers": m, "listed": k, "environments":
    /// [{"key": "...", "subscribers": c, "updated_at": 1736705202.02806}, ...]}`, where
    /// `updated_at` is `null` for an environment whose update time is not known yet.
    pub(super) fn admin_environments(&self) -> Vec<u8> {
        let mut with_subs: Vec<(usize, &Env)> = self
            .env_ids
            .values()
            .filter_map(|&id| self.envs.get(id as usize))
            .map(|env| (env.subs.len(), env))
            .filter(|(n, _)| *n > 0)
            .collect();
        let environments = with_subs.len();
        let subscribers: usize = with_subs.iter().map(|(n, _)| n).sum();
        // Largest first; equal counts by key, so that the answer does not depend on slab order.
        let order =
            |a: &(usize, &Env), b: &(usize, &Env)| b.0.cmp(&a.0).then(a.1.key.cmp(&b.1.key));
        if with_subs.len() > MAX_LISTED {
            with_subs.select_nth_unstable_by(MAX_LISTED - 1, order);
            with_subs.truncate(MAX_LISTED);
        }
        with_subs.sort_unstable_by(order);
        let mut out = Vec::with_capacity(96 + with_subs.len() * 80);
        // Writing to a Vec cannot fail.
        let _ = write!(
            out,
            "{{\"environments_with_subscribers\": {environments}, \"subscribers\": {subscribers}, \"listed\": {}, \"environments\": [",
            with_subs.len()
        );
        for (i, (n, env)) in with_subs.iter().enumerate() {
            if i > 0 {
                out.extend_from_slice(b", ");
            }
            // Only a subscription creates a subscriber, and its key was checked against
            // [A-Za-z0-9._-]: nothing to escape.
            let _ = write!(
                out,
                "{{\"key\": \"{}\", \"subscribers\": {n}, \"updated_at\": ",
                env.key
            );
            match env.time {
                Some(t) => timestamp::write_epoch_seconds(t, &mut out),
                None => out.extend_from_slice(b"null"),
            }
            out.push(b'}');
        }
        out.extend_from_slice(b"]}");
        out
    }
}
