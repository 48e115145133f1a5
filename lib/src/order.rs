//! The order between services that manifests' `after` lines make: who
//! waits for whom to start, and who stops first. A graph of service names,
//! each with the names it comes after; names that no service has are left
//! out of every answer.

use std::collections::{BTreeMap, BTreeSet};

use crate::name::ServiceName;

/// Each service's `after`, by name.
pub type Graph = BTreeMap<ServiceName, Vec<ServiceName>>;

/// A path `from → … → from` through `after` edges, if `from` is on a cycle:
/// the names along it, `from` first and last.
pub fn cycle_through(graph: &Graph, from: &ServiceName) -> Option<Vec<ServiceName>> {
    // Depth first, keeping the path; each name is expanded once.
    let mut seen = BTreeSet::new();
    let mut path = vec![from.clone()];
    find(graph, from, from, &mut seen, &mut path).then_some(path)
}

fn find<'g>(
    graph: &'g Graph,
    at: &ServiceName,
    target: &ServiceName,
    seen: &mut BTreeSet<&'g ServiceName>,
    path: &mut Vec<ServiceName>,
) -> bool {
    for next in graph.get(at).into_iter().flatten() {
        if next == target {
            path.push(next.clone());
            return true;
        }
        if !graph.contains_key(next) || !seen.insert(next) {
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
pub fn cycle_error(graph: &Graph, from: &ServiceName) -> Option<(ServiceName, String)> {
    let path = cycle_through(graph, from)?;
    let first = path.get(1)?.clone();
    let shown: Vec<&str> = path.iter().map(ServiceName::as_str).collect();
    let message = format!(
        "after {first}: a cycle ({}): none of them could start first",
        shown.join(" → ")
    );
    Some((first, message))
}

/// Whether `from` reaches `to` through `after` edges (one or more).
pub fn reaches(graph: &Graph, from: &ServiceName, to: &ServiceName) -> bool {
    let mut seen = BTreeSet::new();
    let mut stack = vec![from];
    while let Some(at) = stack.pop() {
        for next in graph.get(at).into_iter().flatten() {
            if next == to {
                return true;
            }
            if seen.insert(next) {
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
pub fn stop_groups(graph: &Graph) -> Vec<Vec<ServiceName>> {
    let mut left: BTreeSet<&ServiceName> = graph.keys().collect();
    let mut groups = Vec::new();
    while !left.is_empty() {
        // Those no remaining service waits for.
        let free: Vec<&ServiceName> = left
            .iter()
            .copied()
            .filter(|s| {
                !left
                    .iter()
                    .any(|o| o != s && graph.get(*o).is_some_and(|after| after.contains(s)))
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
        groups.push(group.into_iter().cloned().collect());
    }
    groups
}

#[cfg(test)]
mod tests {
    use super::*;

    fn n(s: &str) -> ServiceName {
        ServiceName::new(s).unwrap()
    }

    fn graph(edges: &[(&str, &[&str])]) -> Graph {
        edges
            .iter()
            .map(|(s, after)| (n(s), after.iter().map(|a| n(a)).collect()))
            .collect()
    }

    fn cycle(g: &Graph, from: &str) -> Option<Vec<String>> {
        cycle_through(g, &n(from)).map(|p| p.iter().map(ServiceName::to_string).collect())
    }

    fn groups(g: &Graph) -> Vec<Vec<String>> {
        stop_groups(g)
            .into_iter()
            .map(|grp| grp.into_iter().map(|s| s.to_string()).collect())
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
            cycle(&g, "web"),
            Some(vec!["web".into(), "api".into(), "web".into()])
        );
        assert_eq!(cycle(&g, "db"), None);
        assert_eq!(cycle(&g, "worker"), None);
        let long = graph(&[("a", &["b"]), ("b", &["c"]), ("c", &["a"])]);
        assert_eq!(cycle(&long, "a").unwrap().join(" → "), "a → b → c → a");
        let reach = |g: &Graph, a: &str, b: &str| reaches(g, &n(a), &n(b));
        assert!(reach(&long, "a", "c") && reach(&long, "c", "b"));
        assert!(reach(&g, "worker", "db") && !reach(&g, "db", "worker"));
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
            groups(&g),
            [
                vec!["alone", "web", "worker"],
                vec!["api", "cache"],
                vec!["db"]
            ]
        );
        let none = graph(&[("a", &[]), ("b", &[])]);
        assert_eq!(groups(&none), [vec!["a", "b"]]);
        // A cycle stops together, after what waits for it.
        let cyc = graph(&[("a", &["b"]), ("b", &["a"]), ("c", &["a"]), ("d", &[])]);
        assert_eq!(groups(&cyc), [vec!["c", "d"], vec!["a", "b"]]);
        assert!(stop_groups(&Graph::new()).is_empty());
    }
}
