//! The order between services that manifests' `after` lines make: who
//! waits for whom to start, and who stops first. A graph of service names,
//! each with the names it comes after; names that no service has are left
//! out of every answer.

use std::collections::{BTreeMap, BTreeSet};

/// Each service's `after`, by name.
pub type Graph = BTreeMap<String, Vec<String>>;

/// A path `from → … → from` through `after` edges, if `from` is on a cycle:
/// the names along it, `from` first and last.
pub fn cycle_through(graph: &Graph, from: &str) -> Option<Vec<String>> {
    // Depth first, keeping the path; each name is expanded once.
    let mut seen = BTreeSet::new();
    let mut path = vec![from.to_string()];
    find(graph, from, from, &mut seen, &mut path).then_some(path)
}

fn find(
    graph: &Graph,
    at: &str,
    target: &str,
    seen: &mut BTreeSet<String>,
    path: &mut Vec<String>,
) -> bool {
    for next in graph.get(at).into_iter().flatten() {
        if next == target {
            path.push(next.clone());
            return true;
        }
        if !graph.contains_key(next) || !seen.insert(next.clone()) {
            continue;
        }
        path.push(next.clone());
        if find(graph, next, target, seen, path) {
            return true;
        }
        path.pop();
    }
    false
}

/// If `from` is on a cycle: the service of its `after` that the cycle goes
/// through (where to point the error), and the error.
pub fn cycle_error(graph: &Graph, from: &str) -> Option<(String, String)> {
    let path = cycle_through(graph, from)?;
    let first = path.get(1).cloned().unwrap_or_default();
    let message = format!(
        "after {first}: a cycle ({}): none of them could start first",
        path.join(" → ")
    );
    Some((first, message))
}

/// Whether `from` reaches `to` through `after` edges (one or more).
pub fn reaches(graph: &Graph, from: &str, to: &str) -> bool {
    let mut seen = BTreeSet::new();
    let mut stack = vec![from];
    while let Some(at) = stack.pop() {
        for next in graph.get(at).into_iter().flatten() {
            if next == to {
                return true;
            }
            if seen.insert(next.as_str()) {
                stack.push(next);
            }
        }
    }
    false
}

/// The services in the order they stop: each group once every service that
/// comes after it (waits for it) has stopped, so that a service's
/// dependencies outlive its requests in flight. Without any `after` it is
/// one group of everything. Services on a cycle stop together, with
/// whatever else is left at that point.
pub fn stop_groups(graph: &Graph) -> Vec<Vec<String>> {
    let mut left: BTreeSet<&str> = graph.keys().map(String::as_str).collect();
    let mut groups = Vec::new();
    while !left.is_empty() {
        // Those no remaining service waits for.
        let free: Vec<&str> = left
            .iter()
            .copied()
            .filter(|s| {
                !left
                    .iter()
                    .any(|o| o != s && graph[*o].iter().any(|d| d == s))
            })
            .collect();
        let group = if free.is_empty() {
            left.iter().copied().collect()
        } else {
            free
        };
        for s in &group {
            left.remove(s);
        }
        groups.push(group.into_iter().map(String::from).collect());
    }
    groups
}

#[cfg(test)]
mod tests {
    use super::*;

    fn graph(edges: &[(&str, &[&str])]) -> Graph {
        edges
            .iter()
            .map(|(s, after)| (s.to_string(), after.iter().map(|a| a.to_string()).collect()))
            .collect()
    }

    #[test]
    fn cycles_are_found_with_their_path() {
        let g = graph(&[
            ("web", &["api"]),
            ("api", &["db", "web"]),
            ("db", &[]),
            ("worker", &["db", "gone"]),
        ]);
        assert_eq!(
            cycle_through(&g, "web"),
            Some(vec!["web".into(), "api".into(), "web".into()])
        );
        assert_eq!(cycle_through(&g, "db"), None);
        assert_eq!(cycle_through(&g, "worker"), None);
        let long = graph(&[("a", &["b"]), ("b", &["c"]), ("c", &["a"])]);
        assert_eq!(
            cycle_through(&long, "a").unwrap().join(" → "),
            "a → b → c → a"
        );
        assert!(reaches(&long, "a", "c") && reaches(&long, "c", "b"));
        assert!(reaches(&g, "worker", "db") && !reaches(&g, "db", "worker"));
    }

    #[test]
    fn dependents_stop_first() {
        let g = graph(&[
            ("web", &["api", "cache"]),
            ("api", &["db"]),
            ("db", &[]),
            ("cache", &[]),
            ("alone", &[]),
            ("worker", &["db", "gone"]),
        ]);
        assert_eq!(
            stop_groups(&g),
            [
                vec!["alone", "web", "worker"],
                vec!["api", "cache"],
                vec!["db"]
            ]
        );
        let none = graph(&[("a", &[]), ("b", &[])]);
        assert_eq!(stop_groups(&none), [vec!["a", "b"]]);
        // A cycle stops together, after what waits for it.
        let cyc = graph(&[("a", &["b"]), ("b", &["a"]), ("c", &["a"]), ("d", &[])]);
        assert_eq!(stop_groups(&cyc), [vec!["c", "d"], vec!["a", "b"]]);
        assert!(stop_groups(&Graph::new()).is_empty());
    }
}
