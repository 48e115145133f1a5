//! What is read before a decision: the manifests of the manifests
//! directory (and whether their env files changed), whether deployd's
//! binary is there for `reexec`, and at start, the records of the state
//! directory and the instances the deployd before handed on.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use deployd_lib::core::{History, Loaded};
use deployd_lib::host;
use deployd_lib::manifest::{self, LoadError};
use deployd_lib::name::ServiceName;
use deployd_lib::rollout::{Refusal, RefusalKind, Running, Spec};
use deployd_lib::suggest;

use super::Runtime;
use crate::handoff::{self, Handoff};
use crate::process;

impl Runtime {
    /// The `*.manifest` files of the manifests directory in name order, but
    /// not hidden ones: Emacs's lock file `.#web.manifest` while web is
    /// being edited, or macOS's `._web.manifest` in a copied directory, is
    /// no service.
    fn manifest_files(&self) -> std::io::Result<Vec<PathBuf>> {
        let mut files: Vec<PathBuf> = std::fs::read_dir(&self.config.manifests)?
            .filter_map(|e| e.ok())
            .filter(|e| !e.file_name().as_encoded_bytes().starts_with(b"."))
            .map(|e| e.path())
            .filter(|p| p.extension().is_some_and(|x| x == "manifest"))
            .collect();
        files.sort();
        Ok(files)
    }

    /// Loads a manifest of the manifests directory ([`host::load`]), but
    /// not through a link that leads out of it: deployd runs as root, and a
    /// manifest that is a link to `/etc/shadow` would have its lines shown
    /// in the errors, in events that other users may read.
    fn load_file(&self, path: &Path) -> Result<manifest::Loaded, LoadError> {
        if path.is_symlink() {
            let dir = self.config.manifests.canonicalize();
            let target = path.canonicalize();
            if let (Ok(dir), Ok(target)) = (dir, target) {
                if !target.starts_with(&dir) {
                    return Err(LoadError::Io {
                        file: path.display().to_string(),
                        error: format!(
                            "a link to {}, outside the manifests directory; refused",
                            target.display()
                        ),
                        not_found: false,
                    });
                }
            }
        }
        let loaded = host::load(path)?;
        host::check_limits(path, loaded, &self.children.tracking().controllers())
    }

    /// A manifest as an `apply` takes it, with the instances whose env
    /// files changed since they started.
    fn loaded(&self, name: &ServiceName, loaded: manifest::Loaded) -> Loaded {
        let spec = Spec::new(loaded.manifest, loaded.text);
        let env_changed = self
            .core
            .sid(name)
            .map(|sid| self.env_changed(sid, &spec))
            .unwrap_or_default();
        Loaded { spec, env_changed }
    }

    /// `apply SERVICE`: its manifest, or why it cannot be had.
    pub(super) fn load_for_apply(&self, service: &ServiceName) -> Result<Loaded, Refusal> {
        let path = self.config.manifests.join(format!("{service}.manifest"));
        match self.load_file(&path) {
            Ok(loaded) => Ok(self.loaded(service, loaded)),
            Err(LoadError::Io {
                not_found: true,
                error,
                ..
            }) => Err(Refusal {
                kind: RefusalKind::NotFound,
                message: if path.is_symlink() {
                    format!("no manifest for {service}: {} is {error}", path.display())
                } else {
                    let stems: Vec<String> = self
                        .manifest_files()
                        .unwrap_or_default()
                        .iter()
                        .filter_map(|p| Some(p.file_stem()?.to_str()?.to_string()))
                        .collect();
                    let close =
                        suggest::closest(service.as_str(), stems.iter().map(String::as_str))
                            .map(|s| format!(" (did you mean {s}? {s}.manifest is there)"))
                            .unwrap_or_default();
                    format!(
                        "no manifest for {service}: {} does not exist{close}",
                        path.display()
                    )
                },
            }),
            Err(e) => Err(Refusal {
                kind: RefusalKind::Invalid,
                message: e.to_string(),
            }),
        }
    }

    /// `apply` of every manifest: each loaded, or its error; or why there
    /// are none.
    #[allow(clippy::type_complexity)]
    pub(super) fn load_all(&self) -> Result<Vec<Result<(ServiceName, Loaded), String>>, Refusal> {
        let dir = &self.config.manifests;
        let files = self.manifest_files().map_err(|e| Refusal {
            kind: RefusalKind::NotFound,
            message: format!("manifests directory {}: {e}", dir.display()),
        })?;
        if files.is_empty() {
            return Err(Refusal {
                kind: RefusalKind::NotFound,
                message: format!("no *.manifest file in {}", dir.display()),
            });
        }
        Ok(files
            .iter()
            .map(|f| match self.load_file(f) {
                Ok(l) => {
                    let name = l.service.clone();
                    Ok((name.clone(), self.loaded(&name, l)))
                }
                Err(e) => Err(e.to_string()),
            })
            .collect())
    }

    /// The binary `reexec` runs, shown, or why it cannot.
    pub(super) fn reexec_binary(&self) -> Result<String, Refusal> {
        let Some(exe) = &self.exe else {
            return Err(Refusal {
                kind: RefusalKind::Busy,
                message: "deployd cannot find its own binary".into(),
            });
        };
        if !process::is_executable_file(exe) {
            return Err(Refusal {
                kind: RefusalKind::NotFound,
                message: format!("{} is not an executable file", exe.display()),
            });
        }
        Ok(exe.display().to_string())
    }

    /// Services with an instance deployd could not hand on: its process
    /// not started yet, or no second descriptor of its output pipe.
    pub(super) fn unhandable(&self) -> Vec<u32> {
        self.services
            .iter()
            .filter(|(_, r)| {
                !r.instances
                    .values()
                    .all(|i| i.pid.is_some() && i.log_read.is_some())
            })
            .map(|(sid, _)| *sid)
            .collect()
    }

    /// A service's record and the manifests of its history.
    fn load_record(
        &self,
        name: &ServiceName,
    ) -> Result<(deployd_lib::core::Saved, History), crate::store::StoreError> {
        let saved = self.store.load(name)?;
        let mut history = Vec::new();
        for v in &saved.history {
            match self.store.load_manifest(name, *v) {
                Ok(text) => history.push((*v, std::sync::Arc::<str>::from(text))),
                Err(e) => tracing::warn!("{name}: manifest {v}: {e}"),
            }
        }
        Ok((saved, history))
    }

    /// Brings back every recorded service, or on a clean start deploys every
    /// manifest of the manifests directory. First kills what a previous
    /// deployd left running. With `handoff` (deployd replaced itself), the
    /// instances it names are taken back rather than killed and started
    /// again.
    pub fn start(&mut self, handoff: Option<Handoff>) {
        if self.cluster.is_some() {
            // What a deployd killed here left running is killed (its
            // instances are the leader's to place again); what runs here
            // comes from etcd, as the copy fills.
            let leftovers: Vec<(u32, u64)> = self
                .store
                .all_pids()
                .into_iter()
                .flat_map(|(_, groups)| groups)
                .collect();
            let n = process::procfs::kill_leftovers(&leftovers);
            if n > 0 {
                tracing::info!("killed {n} process groups left by a previous deployd");
            }
            self.views.set_whole();
            self.publish_cluster();
            return;
        }
        let mut handed: HashMap<String, Vec<handoff::Instance>> = handoff
            .map(|h| {
                h.services
                    .into_iter()
                    .map(|s| (s.name, s.instances))
                    .collect()
            })
            .unwrap_or_default();
        let kept: Vec<u32> = handed.values().flatten().map(|i| i.pid).collect();
        // What a deployd that did not stop its instances (killed, crashed)
        // left recorded: a clean stop leaves no pid behind.
        let mut ended: HashMap<String, Vec<u32>> = HashMap::new();
        let mut leftovers: Vec<(u32, u64)> = Vec::new();
        for (service, groups) in self.store.all_pids() {
            for (pid, start) in groups.into_iter().filter(|(p, _)| !kept.contains(p)) {
                ended.entry(service.clone()).or_default().push(pid);
                leftovers.push((pid, start));
            }
        }
        if !leftovers.is_empty() {
            let n = process::procfs::kill_leftovers(&leftovers);
            if n > 0 {
                tracing::info!("killed {n} process groups left by a previous deployd");
            }
        }
        let recorded = self.store.services();
        if recorded.is_empty() {
            self.deploy_manifests_dir();
        }
        for name in &recorded {
            let running = handed.remove(name.as_str()).unwrap_or_default();
            let restored = match running.is_empty() {
                true => {
                    let ended = ended.remove(name.as_str()).unwrap_or_default();
                    self.restore(name, &recorded, &ended)
                }
                false => self.restore_adopting(name, running),
            };
            if let Err(e) = restored {
                tracing::error!("{name}: cannot restore: {e}");
            }
        }
        // Once all are back: a service can wait only for one restored
        // stopped, whichever came first.
        let effects = self.core.restored();
        self.carry_out(effects);
        // Instances of services that are no longer recorded.
        handed
            .into_values()
            .flatten()
            .for_each(handoff::Instance::discard);
        // And what was left of instances not taken back.
        if let Some(c) = self.children.tracking().cgroups() {
            c.adopted_all();
        }
        self.settle();
        // Now the root ctl appears: a service not there then is not
        // deployd still coming back, but gone (or never deployed).
        self.views.set_whole();
        let untaken = self.proxies.passed().untaken();
        if !untaken.is_empty() {
            tracing::warn!(
                "socket activation: no service has port {untaken:?}; its connections wait unanswered"
            );
        }
    }

    /// deployd's first start with nothing recorded: every manifest of the
    /// manifests directory is deployed, those that load.
    fn deploy_manifests_dir(&mut self) {
        let files = match self.manifest_files() {
            Ok(f) => f,
            Err(e) => {
                let dir = self.config.manifests.display();
                tracing::warn!("manifests directory {dir}: {e}");
                return;
            }
        };
        let mut specs = Vec::new();
        let mut errors = Vec::new();
        for file in files {
            match self.load_file(&file) {
                Ok(l) => specs.push((l.service, Spec::new(l.manifest, l.text))),
                Err(e) => errors.push(e.to_string()),
            }
        }
        let effects = self.core.deploy_all(specs, errors);
        self.carry_out(effects);
    }

    /// Brings a recorded service back at its recorded versions.
    fn restore(
        &mut self,
        name: &ServiceName,
        coming: &[ServiceName],
        ended: &[u32],
    ) -> Result<(), String> {
        let (saved, history) = self.load_record(name).map_err(|e| e.to_string())?;
        let effects = self
            .core
            .restore(name.clone(), &saved, history, coming, ended)?;
        self.saved_first(name, saved);
        self.carry_out(effects);
        Ok(())
    }

    /// Restores a service whose instances ran on while deployd replaced
    /// itself: they are taken back (their output pipes, their exits, their
    /// probes); one that no longer fits its slot is killed.
    fn restore_adopting(
        &mut self,
        name: &ServiceName,
        mut running: Vec<handoff::Instance>,
    ) -> Result<(), String> {
        running.sort_by_key(|i| i.number);
        let list: Vec<Running> = running
            .iter()
            .map(|i| Running {
                slot: i.slot,
                number: i.number,
                version: i.version,
                pid: i.pid,
            })
            .collect();
        let adopted =
            self.load_record(name)
                .map_err(|e| e.to_string())
                .and_then(|(saved, history)| {
                    let adopted = self.core.adopt(name.clone(), &saved, history, &list)?;
                    Ok((saved, adopted))
                });
        let (saved, deployd_lib::core::Adopted { sid, ids, effects }) = match adopted {
            Ok(x) => x,
            Err(e) => {
                running.into_iter().for_each(handoff::Instance::discard);
                return Err(e);
            }
        };
        self.saved_first(name, saved);
        for (h, id) in running.into_iter().zip(ids) {
            match id {
                Some(id) => self.adopt_instance(sid, id, h),
                None => h.discard(),
            }
        }
        self.carry_out(effects);
        Ok(())
    }
}
