//! Building: a validated flow → a runnable [`Flow`]. Compiles scripts and checks what needs
//! files, but connects nothing and spawns nothing, so a flow that fails to build leaves nothing
//! behind.

use std::path::Path;
use std::sync::Arc;

use super::validate::{validate_all, ValidatedFlow};
use super::{FlowError, FlowErrorKind, FlowErrors};
use crate::config::Config;
use crate::engine::{assemble, Flow};
use crate::node::{BuildCtx, Registry, ShippedScripts, ValidateCtx};
use crate::services::Services;

/// Builds every node of a validated flow; returns every problem at once.
pub fn build_flow(
    v: &ValidatedFlow,
    registry: &Registry,
    config: Arc<Config>,
    services: Arc<Services>,
) -> Result<Flow, Vec<FlowError>> {
    build_flow_with(v, registry, config, services, Arc::default())
}

/// [`build_flow`], with scripts that came with the flow used instead of the files on disk.
pub fn build_flow_with(
    v: &ValidatedFlow,
    registry: &Registry,
    config: Arc<Config>,
    services: Arc<Services>,
    shipped: Arc<ShippedScripts>,
) -> Result<Flow, Vec<FlowError>> {
    let ctx = BuildCtx {
        flow: v.name.clone(),
        file: v.file.clone(),
        config,
        services: services.clone(),
        shipped,
    };
    let mut errors = Vec::new();
    let mut nodes = Vec::new();
    for ix in v.graph.node_indices() {
        let decl = &v.graph[ix];
        if v.invalid.contains(&decl.id) {
            continue;
        }
        // Validation resolved every type.
        let Some(kind) = registry.get(&decl.type_name) else {
            continue;
        };
        let spec = kind.spec();
        match kind.build(decl, &ctx) {
            Ok(built) => nodes.push((decl.id.clone(), spec.type_name, built, spec.outputs)),
            Err(problems) => errors.extend(
                problems
                    .into_iter()
                    .map(|p| v.error_at(decl, p.property.as_deref(), p.kind)),
            ),
        }
    }
    // A partial flow (nodes that failed validation were skipped) is never assembled.
    if !errors.is_empty() || !v.invalid.is_empty() {
        return Err(errors);
    }
    // Node indices of a graph without removals are 0..n in insertion order, the same order
    // as `nodes`; edge indices are in file order, which is the propagation order.
    let edges = v
        .graph
        .edge_indices()
        .filter_map(|e| {
            let (a, b) = v.graph.edge_endpoints(e)?;
            Some((a.index(), v.graph[e].from_terminal.clone(), b.index()))
        })
        .collect();
    Ok(assemble(
        v.name.clone(),
        v.file.clone(),
        nodes,
        edges,
        services,
    ))
}

/// Reads, validates and builds one flow file.
pub fn load_flow(
    path: &Path,
    registry: &Registry,
    config: Arc<Config>,
    services: Arc<Services>,
) -> Result<Flow, FlowErrors> {
    let text = std::fs::read_to_string(path).map_err(|e| {
        FlowErrors(vec![FlowError {
            file: path.to_path_buf(),
            pos: None,
            node: None,
            terminal: None,
            kind: FlowErrorKind::Io(e.to_string()),
        }])
    })?;
    load_flow_text(path, &text, registry, config, services)
}

/// Validates and builds a flow from its text; `path` names it in errors, gives the default
/// name (the file stem) and the directory scripts are relative to.
pub fn load_flow_text(
    path: &Path,
    text: &str,
    registry: &Registry,
    config: Arc<Config>,
    services: Arc<Services>,
) -> Result<Flow, FlowErrors> {
    load_flow_bundle(path, text, Arc::default(), registry, config, services)
}

/// [`load_flow_text`] for a flow deployed with its scripts: the scripts in `shipped` are
/// compiled from there, not read from disk (where they are not written yet).
pub fn load_flow_bundle(
    path: &Path,
    text: &str,
    shipped: Arc<ShippedScripts>,
    registry: &Registry,
    config: Arc<Config>,
    services: Arc<Services>,
) -> Result<Flow, FlowErrors> {
    let vctx = ValidateCtx {
        servers: config.servers.keys().cloned().collect(),
    };
    match validate_all(path, text, registry, &vctx) {
        (Some(v), errors) if errors.is_empty() => {
            build_flow_with(&v, registry, config, services, shipped).map_err(FlowErrors)
        }
        (Some(v), mut errors) => {
            // Build the nodes that did validate too, so their script errors are reported in
            // the same run; the flow itself is not started.
            if let Err(more) = build_flow_with(&v, registry, config, services, shipped) {
                errors.extend(more);
                errors.sort_by_key(|e| e.pos.map(|p| (p.line, p.column)));
            }
            Err(FlowErrors(errors))
        }
        (None, errors) => Err(FlowErrors(errors)),
    }
}

/// The flow files under the given paths: files as given, directories scanned (not
/// recursively) for `*.json`, sorted.
pub fn flow_files(paths: &[std::path::PathBuf]) -> Result<Vec<std::path::PathBuf>, FlowErrors> {
    let mut out = Vec::new();
    for p in paths {
        if p.is_dir() {
            let io = |e: std::io::Error| {
                FlowErrors(vec![FlowError {
                    file: p.clone(),
                    pos: None,
                    node: None,
                    terminal: None,
                    kind: FlowErrorKind::Io(e.to_string()),
                }])
            };
            // An entry that cannot be read fails the whole listing: a flow missing from it
            // would be taken for a removed one.
            let mut files = Vec::new();
            for entry in std::fs::read_dir(p).map_err(io)? {
                let f = entry.map_err(io)?.path();
                if f.extension().is_some_and(|x| x == "json") && f.is_file() {
                    files.push(f);
                }
            }
            files.sort();
            out.extend(files);
        } else {
            out.push(p.clone());
        }
    }
    Ok(out)
}
