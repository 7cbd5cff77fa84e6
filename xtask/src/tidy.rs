//! The layering rule of the workspace, checked against `cargo metadata`.
//!
//! Ranks: `glip-core` 0; `glip-kernels` and the dev-only `glip-testing` 1; `glip-backbone`,
//! `-text`, `-transformer`, `-heads`, `-loss`, `-data` 2; `glip-detectors` 3; `glip-train` 4;
//! `glip-cli`, `xtask` and the benches 5; the examples (a researcher's crate) 6. A normal or
//! build dependency between workspace crates must point to a strictly lower rank: nothing
//! upward, nothing sideways. Dev-dependencies are free, and `glip-testing` may be nothing else.

use anyhow::{bail, Context, Result};
use serde_json::Value;
use std::process::Command;

/// The rank of a workspace crate, `None` for a crate the rule does not know (itself an error).
pub fn rank(name: &str) -> Option<u8> {
    Some(match name {
        "glip-core" => 0,
        "glip-kernels" | "glip-testing" => 1,
        "glip-backbone" | "glip-text" | "glip-transformer" | "glip-heads" | "glip-loss"
        | "glip-data" => 2,
        "glip-detectors" => 3,
        "glip-train" => 4,
        "glip-cli" | "xtask" | "glip-benches" => 5,
        // Examples stand where a researcher's crate does: on top.
        n if n.starts_with("glip-example-") => 6,
        _ => return None,
    })
}

/// Every violation of the layering rule in a `cargo metadata --format-version 1` document.
pub fn violations(metadata: &Value) -> Vec<String> {
    let mut out = Vec::new();
    let members: Vec<&str> = metadata["workspace_members"]
        .as_array()
        .map(|a| a.iter().filter_map(Value::as_str).collect())
        .unwrap_or_default();
    let packages = metadata["packages"].as_array().cloned().unwrap_or_default();
    let names: Vec<String> = packages
        .iter()
        .filter(|p| p["id"].as_str().is_some_and(|id| members.contains(&id)))
        .filter_map(|p| p["name"].as_str().map(String::from))
        .collect();
    for p in packages.iter().filter(|p| p["id"].as_str().is_some_and(|id| members.contains(&id))) {
        let name = p["name"].as_str().unwrap_or("?");
        let Some(r) = rank(name) else {
            out.push(format!("{name}: workspace crate has no layer; add it to xtask/src/tidy.rs"));
            continue;
        };
        for d in p["dependencies"].as_array().into_iter().flatten() {
            let dep = d["name"].as_str().unwrap_or("?");
            if d["kind"].as_str() == Some("dev") || !names.iter().any(|n| n == dep) {
                continue;
            }
            if dep == "glip-testing" {
                out.push(format!(
                    "{name} depends on glip-testing, which is for tests only (dev-dependencies)"
                ));
                continue;
            }
            match rank(dep) {
                Some(dr) if dr < r => {}
                Some(dr) => out.push(format!(
                    "{name} (layer {r}) depends on {dep} (layer {dr}): {} dependency",
                    if dr == r { "sideways" } else { "upward" }
                )),
                None => out.push(format!("{name} depends on {dep}, which has no layer")),
            }
        }
    }
    out
}

/// Runs `cargo metadata` and fails with every violation listed.
pub fn run() -> Result<()> {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let output = Command::new(cargo)
        .args(["metadata", "--format-version", "1", "--no-deps", "--offline"])
        .output()
        .context("running cargo metadata")?;
    if !output.status.success() {
        bail!("cargo metadata failed: {}", String::from_utf8_lossy(&output.stderr));
    }
    let meta: Value = serde_json::from_slice(&output.stdout).context("parsing cargo metadata")?;
    let v = violations(&meta);
    if !v.is_empty() {
        bail!("layering violations:\n  {}", v.join("\n  "));
    }
    println!("layering ok");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn meta(edges: &[(&str, &str, &str)]) -> Value {
        let crates = ["glip-core", "glip-text", "glip-loss", "glip-train", "glip-cli"];
        json!({
            "workspace_members": crates.iter().map(|c| format!("{c} 0.1.0")).collect::<Vec<_>>(),
            "packages": crates.iter().map(|c| json!({
                "id": format!("{c} 0.1.0"),
                "name": c,
                "dependencies": edges.iter().filter(|e| e.0 == *c)
                    .map(|e| json!({"name": e.1, "kind": if e.2.is_empty() { Value::Null } else { json!(e.2) }}))
                    .collect::<Vec<_>>(),
            })).collect::<Vec<_>>(),
        })
    }

    #[test]
    fn the_real_workspace_is_layered() {
        run().unwrap();
    }

    #[test]
    fn downward_edges_and_dev_dependencies_pass() {
        let m = meta(&[
            ("glip-text", "glip-core", ""),
            ("glip-train", "glip-text", ""),
            ("glip-cli", "glip-train", ""),
            ("glip-loss", "glip-text", "dev"),
            ("glip-text", "serde", ""),
        ]);
        assert_eq!(violations(&m), Vec::<String>::new());
    }

    #[test]
    fn upward_and_sideways_edges_fail() {
        let m = meta(&[("glip-core", "glip-train", ""), ("glip-loss", "glip-text", "build")]);
        let v = violations(&m);
        assert_eq!(v.len(), 2, "{v:?}");
        assert!(v[0].contains("glip-core (layer 0) depends on glip-train (layer 4): upward"));
        assert!(v[1].contains("glip-loss (layer 2) depends on glip-text (layer 2): sideways"));
    }

    #[test]
    fn the_test_helpers_are_a_dev_dependency_only() {
        let crates = ["glip-testing", "glip-train"];
        let edge = |kind: Value| {
            json!({
                "workspace_members": crates.iter().map(|c| format!("{c} 0.1.0")).collect::<Vec<_>>(),
                "packages": [
                    {"id": "glip-testing 0.1.0", "name": "glip-testing", "dependencies": []},
                    {"id": "glip-train 0.1.0", "name": "glip-train",
                     "dependencies": [{"name": "glip-testing", "kind": kind}]},
                ],
            })
        };
        assert_eq!(violations(&edge(json!("dev"))), Vec::<String>::new());
        let v = violations(&edge(Value::Null));
        assert!(v.len() == 1 && v[0].contains("for tests only"), "{v:?}");
    }
}
