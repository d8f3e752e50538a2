//! Each crate's modules stand in one order, written in ARCHITECTURE.md ("Module order"): a
//! module names (`crate::x`, or `super::x` from a top-level file) only modules before it in
//! its line. A module's `#[cfg(test)] mod tests` may use any module of its crate. The
//! binary's own tree (agent/src/cli, under main.rs) sits above the library and is not listed.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// "crate: a b c" lines of ARCHITECTURE.md's "Module order" block.
fn orders() -> BTreeMap<String, Vec<String>> {
    let text = std::fs::read_to_string(root().join("ARCHITECTURE.md")).unwrap();
    let section = text
        .split("## Module order")
        .nth(1)
        .expect("ARCHITECTURE.md has a '## Module order' section");
    let block = section
        .split("```")
        .nth(1)
        .expect("a fenced block of 'crate: modules' lines");
    block
        .lines()
        .filter_map(|l| l.split_once(':'))
        .map(|(c, ms)| {
            (
                c.trim().to_owned(),
                ms.split_whitespace().map(str::to_owned).collect(),
            )
        })
        .collect()
}

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for e in std::fs::read_dir(dir).unwrap().flatten() {
        let p = e.path();
        if p.is_dir() {
            rust_files(&p, out);
        } else if p.extension().is_some_and(|x| x == "rs") {
            out.push(p);
        }
    }
}

/// The code of a file without comments and without its `#[cfg(test)]` tail.
fn code(path: &Path) -> String {
    let text = std::fs::read_to_string(path).unwrap();
    let text = match text.find("#[cfg(test)]\nmod tests") {
        Some(i) => &text[..i],
        None => &text[..],
    };
    text.lines()
        .map(|l| match l.find("//") {
            Some(i) => &l[..i],
            None => l,
        })
        .collect::<Vec<_>>()
        .join("\n")
}

/// The module names after `prefix` (`crate::`), including those in a `{a, b::c}` group.
fn names_after(code: &str, prefix: &str) -> Vec<String> {
    let mut out = Vec::new();
    for (i, _) in code.match_indices(prefix) {
        let before = code[..i].chars().last();
        if before.is_some_and(|c| c.is_alphanumeric() || c == '_') {
            continue;
        }
        let rest = &code[i + prefix.len()..];
        if let Some(group) = rest.strip_prefix('{') {
            let group = &group[..group.find('}').unwrap_or(group.len())];
            for item in group.split(',') {
                let name: String = item
                    .trim()
                    .chars()
                    .take_while(|c| c.is_alphanumeric() || *c == '_')
                    .collect();
                out.push(name);
            }
        } else {
            out.push(
                rest.chars()
                    .take_while(|c| c.is_alphanumeric() || *c == '_')
                    .collect(),
            );
        }
    }
    out.retain(|n| n.chars().next().is_some_and(|c| c.is_lowercase()));
    out
}

#[test]
fn no_module_uses_one_above_it() {
    let orders = orders();
    let mut problems = Vec::new();
    for (krate, order) in &orders {
        let src = root().join(krate).join("src");
        let mut files = Vec::new();
        rust_files(&src, &mut files);
        let rank = |m: &str| order.iter().position(|x| x == m);
        for f in files {
            let rel = f.strip_prefix(&src).unwrap();
            let parts: Vec<_> = rel
                .iter()
                .map(|p| p.to_string_lossy().into_owned())
                .collect();
            let module = parts[0].trim_end_matches(".rs").to_owned();
            if module == "lib" || module == "main" || (krate == "agent" && module == "cli") {
                continue;
            }
            let Some(mine) = rank(&module) else {
                problems.push(format!(
                    "{krate}: module `{module}` is not in ARCHITECTURE.md's module order"
                ));
                continue;
            };
            let code = code(&f);
            let mut used = names_after(&code, "crate::");
            if parts.len() == 1 {
                used.extend(names_after(&code, "super::"));
            }
            for u in used {
                if u == module {
                    continue;
                }
                match rank(&u) {
                    Some(r) if r > mine => problems.push(format!(
                        "{krate}: {} uses `{u}`, which stands above `{module}`",
                        rel.display()
                    )),
                    _ => {}
                }
            }
        }
    }
    problems.sort();
    problems.dedup();
    assert!(problems.is_empty(), "{}", problems.join("\n"));
}
