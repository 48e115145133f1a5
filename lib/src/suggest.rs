//! "Did you mean": the known word closest to a mistyped one, for the errors
//! of the manifest parser, the ctl files and the CLI.

/// The word of `known` closest to `word` (case aside), if it is within a
/// third of its length in edits (at least one): `update_bach` finds
/// `update_batch`, `wroker` finds `worker`, `zz` finds nothing. Of two as
/// close, the first in name order, whatever the order of `known`.
pub fn closest<'a>(word: &str, known: impl IntoIterator<Item = &'a str>) -> Option<&'a str> {
    let lower = word.to_ascii_lowercase();
    known
        .into_iter()
        .map(|k| {
            (
                strsim::damerau_levenshtein(&lower, &k.to_ascii_lowercase()),
                k,
            )
        })
        .filter(|(d, k)| *d <= (k.len() / 3).max(1))
        .min_by_key(|&(d, k)| (d, k))
        .map(|(_, k)| k)
}

/// `" (did you mean 'x'?)"` when a word of `known` is close to `word`,
/// else nothing.
pub fn did_you_mean<'a>(word: &str, known: impl IntoIterator<Item = &'a str>) -> String {
    closest(word, known)
        .map(|k| format!(" (did you mean '{k}'?)"))
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_the_closest_known_word() {
        let known = ["worker", "web", "api"];
        assert_eq!(closest("wroker", known), Some("worker"));
        assert_eq!(closest("Worker", known), Some("worker"));
        assert_eq!(closest("wbe", known), Some("web"));
        assert_eq!(closest("db", known), None);
        assert_eq!(closest("workers-old", known), None);
        assert_eq!(closest("x", []), None);
        assert_eq!(closest("ab", ["ac", "aa"]), Some("aa"));
        assert_eq!(closest("ab", ["aa", "ac"]), Some("aa"));
        assert_eq!(did_you_mean("ap", known), " (did you mean 'api'?)");
        assert_eq!(did_you_mean("zzz", known), "");
    }
}
