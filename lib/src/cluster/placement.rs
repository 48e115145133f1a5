//! Where a new instance goes: on an eligible live host, spreading each
//! service evenly: the fewest instances of this service first, then the
//! fewest in total, then the first name.

use std::collections::BTreeMap;

use crate::name::HostName;

/// A host as placement sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostLoad {
    /// Its name.
    pub name: HostName,
    /// Whether it may take the instance: live, not drained, and named by
    /// the service's `hosts` if it has any.
    pub eligible: bool,
    /// Live instances of this service on it, not counting the one the new
    /// instance replaces.
    pub of_service: usize,
    /// Live instances of every service on it.
    pub total: usize,
}

/// The host for a new instance, or `None` if no host is eligible.
pub fn choose(hosts: &[HostLoad]) -> Option<HostName> {
    hosts
        .iter()
        .filter(|h| h.eligible)
        .min_by(|a, b| (a.of_service, a.total, &a.name).cmp(&(b.of_service, b.total, &b.name)))
        .map(|h| h.name.clone())
}

/// Why no host is eligible, for the instance's failure: every host, and
/// what keeps it out.
pub fn why_none(up: &[HostName], drained: &[HostName], allowed: &[HostName]) -> String {
    if up.is_empty() {
        return "no host is up".to_string();
    }
    let mut reasons: BTreeMap<&HostName, &str> = BTreeMap::new();
    for h in up {
        if drained.contains(h) {
            reasons.insert(h, "drained");
        } else if !allowed.is_empty() && !allowed.contains(h) {
            reasons.insert(h, "not in its hosts");
        }
    }
    let said: Vec<String> = reasons.iter().map(|(h, r)| format!("{h} {r}")).collect();
    let missing: Vec<&str> = allowed
        .iter()
        .filter(|h| !up.contains(h))
        .map(|h| h.as_str())
        .collect();
    let mut why = format!("no host can run it ({})", said.join(", "));
    if !missing.is_empty() {
        why.push_str(&format!("; not up: {}", missing.join(", ")));
    }
    why
}

#[cfg(test)]
mod tests {
    use super::*;

    fn h(n: &str) -> HostName {
        HostName::new(n).unwrap()
    }

    fn load(name: &str, of_service: usize, total: usize) -> HostLoad {
        HostLoad {
            name: h(name),
            eligible: true,
            of_service,
            total,
        }
    }

    #[test]
    fn fewest_of_the_service_then_fewest_in_total_then_the_name() {
        let hosts = [load("h2", 1, 1), load("h1", 1, 5), load("h3", 2, 0)];
        assert_eq!(choose(&hosts), Some(h("h2")));
        let hosts = [load("h2", 1, 3), load("h1", 1, 3)];
        assert_eq!(choose(&hosts), Some(h("h1")));
        let hosts = [load("h3", 0, 9), load("h1", 1, 0)];
        assert_eq!(choose(&hosts), Some(h("h3")));
    }

    #[test]
    fn only_eligible_hosts_and_none_says_why() {
        let mut hosts = [load("h1", 0, 0), load("h2", 5, 5)];
        hosts[0].eligible = false;
        assert_eq!(choose(&hosts), Some(h("h2")));
        hosts[1].eligible = false;
        assert_eq!(choose(&hosts), None);
        assert_eq!(
            why_none(&[h("h1"), h("h2")], &[h("h1")], &[h("h1"), h("h9")]),
            "no host can run it (h1 drained, h2 not in its hosts); not up: h9"
        );
        assert_eq!(why_none(&[], &[], &[]), "no host is up");
    }

    /// Six instances placed one after another on three hosts: two each,
    /// whatever else runs there.
    #[test]
    fn a_service_spreads_evenly() {
        let names = ["h1", "h2", "h3"];
        let mut of_service = [0usize; 3];
        let total = [4usize, 0, 2];
        for _ in 0..6 {
            let hosts: Vec<HostLoad> = (0..3)
                .map(|i| load(names[i], of_service[i], total[i] + of_service[i]))
                .collect();
            let chosen = choose(&hosts).unwrap();
            let i = names.iter().position(|n| *n == chosen.as_str()).unwrap();
            of_service[i] += 1;
        }
        assert_eq!(of_service, [2, 2, 2]);
    }
}
