//! The layering as a test: every `crate::<module>` path in the code under
//! `src/` (use statements and paths alike; comments and string literals
//! left out) is checked against [`LAYERS`]:
//!
//! ```text
//! source -> codec -> sink -> checkpoint   no stage imports a later one,
//!                                         and the checkpoint no sink
//! config, telemetry                       import no stage
//! outbox, delivery, error_class, hold,
//! routing, store, database, tls, leader   import no stage, and no Kafka client
//! pipeline, cli, migrate, main, lib       wire the rest: import anything
//! ```
//!
//! A rule two stages both need lives in a module both may import. A new
//! top-level module fails the test until it has a row in [`LAYERS`].

use std::path::Path;

/// What a top-level module of `src/` may import.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Layer {
    /// A pipeline stage, numbered in pipeline order.
    Stage(u8),
    /// `config` and `telemetry`: what everything else stands on.
    Floor,
    /// The types and services the stages share.
    Neutral,
    /// Wires the stages together or runs a command.
    Wiring,
}

/// Every top-level module of `src/` (`lib` is `lib.rs`, `bin` is `src/bin/`).
const LAYERS: &[(&str, Layer)] = &[
    ("source", Layer::Stage(1)),
    ("codec", Layer::Stage(2)),
    ("sink", Layer::Stage(3)),
    ("checkpoint", Layer::Stage(4)),
    ("config", Layer::Floor),
    ("telemetry", Layer::Floor),
    ("outbox", Layer::Neutral),
    ("delivery", Layer::Neutral),
    // What a failure means (retry, operator, hold, step down), for every layer's errors.
    ("error_class", Layer::Neutral),
    ("hold", Layer::Neutral),
    ("routing", Layer::Neutral),
    ("store", Layer::Neutral),
    ("database", Layer::Neutral),
    ("tls", Layer::Neutral),
    // The lease: the pipeline runs while it holds it; it knows no stage.
    ("leader", Layer::Neutral),
    // `relay migrate` sets up the slot and publication through the source.
    ("migrate", Layer::Wiring),
    ("pipeline", Layer::Wiring),
    ("cli", Layer::Wiring),
    ("main", Layer::Wiring),
    ("lib", Layer::Wiring),
    ("bin", Layer::Wiring),
    ("layering_tests", Layer::Neutral),
    // lib.rs's unit-test helpers (start-up as `main` does it), for any module's tests.
    ("tests", Layer::Neutral),
];

fn layer(module: &str) -> Option<Layer> {
    LAYERS.iter().find(|(name, _)| *name == module).map(|&(_, layer)| layer)
}

/// Edges the layer order allows but the layering does not.
const NEVER: &[(&str, &str, &str)] = &[(
    "checkpoint",
    "sink",
    "the checkpoint imports no sink: what both need lives in a neutral module (delivery, hold)",
)];

/// Why module `from` may not import module `to`, if it may not.
fn forbidden(from: &str, to: &str, from_layer: Layer, to_layer: Layer) -> Option<&'static str> {
    use Layer::*;
    if let Some(&(_, _, rule)) = NEVER.iter().find(|(f, t, _)| *f == from && *t == to) {
        return Some(rule);
    }
    match (from_layer, to_layer) {
        (Wiring, _) => None,
        (_, Wiring) => Some("only the wiring (pipeline, cli, migrate, main) imports the wiring"),
        (Stage(from), Stage(to)) if to > from => {
            Some("no stage imports a later one (source -> codec -> sink -> checkpoint); move what both need into a neutral module")
        }
        (Floor, Stage(_)) => Some("config and telemetry import no stage"),
        (Neutral, Stage(_)) => Some("a neutral module imports no stage; move what both need into a neutral module"),
        _ => None,
    }
}

/// The top-level module a file under `src/` belongs to.
fn module_of(relative: &str) -> &str {
    let first = relative.split('/').next().unwrap_or(relative);
    first.strip_suffix(".rs").unwrap_or(first)
}

/// `text` with comments and the contents of string and char literals
/// blanked out (newlines kept, so line numbers stay), leaving only code.
fn code_only(text: &str) -> String {
    let chars: Vec<char> = text.chars().collect();
    let mut out = String::with_capacity(text.len());
    let mut i = 0;
    while i < chars.len() {
        match non_code_end(&chars, i) {
            Some(end) => {
                let end = end.min(chars.len());
                out.extend(chars[i..end].iter().map(|&c| if c == '\n' { '\n' } else { ' ' }));
                i = end;
            }
            None => {
                out.push(chars[i]);
                i += 1;
            }
        }
    }
    out
}

/// Where the comment or literal that starts at `i` ends (exclusive), if
/// one starts there.
fn non_code_end(chars: &[char], i: usize) -> Option<usize> {
    let is_ident = |k: usize| chars[k].is_alphanumeric() || chars[k] == '_';
    // `br"..."` is a raw string too: its `b` is a prefix, not an identifier.
    let byte_prefix = i > 0 && chars[i - 1] == 'b' && (i < 2 || !is_ident(i - 2));
    let ident_before = i > 0 && is_ident(i - 1) && !byte_prefix;
    let quote_after = |from: usize| chars.get(from..)?.iter().position(|&q| q == '\'').map(|p| from + p + 1);
    match (chars[i], chars.get(i + 1).copied()) {
        ('/', Some('/')) => Some(chars[i..].iter().position(|&c| c == '\n').map_or(chars.len(), |p| i + p)),
        ('/', Some('*')) => Some(block_comment_end(chars, i)),
        ('r', Some('"' | '#')) if !ident_before => raw_string_end(chars, i),
        ('"', _) => Some(string_end(chars, i)),
        // A char literal ('"', '\''); a lifetime ('a) is code.
        ('\'', Some('\\')) => Some(quote_after(i + 3).unwrap_or(chars.len())),
        ('\'', _) if chars.get(i + 2) == Some(&'\'') => Some(i + 3),
        _ => None,
    }
}

fn block_comment_end(chars: &[char], start: usize) -> usize {
    let (mut depth, mut k) = (0, start);
    while k < chars.len() {
        if chars[k..].starts_with(&['/', '*']) {
            depth += 1;
            k += 2;
        } else if chars[k..].starts_with(&['*', '/']) {
            depth -= 1;
            k += 2;
            if depth == 0 {
                return k;
            }
        } else {
            k += 1;
        }
    }
    k
}

/// `r"..."` or `r#"..."#`; `None` for a raw identifier (`r#type`).
fn raw_string_end(chars: &[char], start: usize) -> Option<usize> {
    let hashes = chars[start + 1..].iter().take_while(|&&h| h == '#').count();
    if chars.get(start + 1 + hashes) != Some(&'"') {
        return None;
    }
    let close: Vec<char> = std::iter::once('"').chain(std::iter::repeat_n('#', hashes)).collect();
    let body = start + 2 + hashes;
    Some((body..chars.len()).find(|&k| chars[k..].starts_with(&close)).map_or(chars.len(), |k| k + close.len()))
}

fn string_end(chars: &[char], start: usize) -> usize {
    let mut k = start + 1;
    while k < chars.len() && chars[k] != '"' {
        k += if chars[k] == '\\' { 2 } else { 1 };
    }
    k + 1
}

/// The modules a `crate::` path at `rest` (just after `crate::`) names:
/// one, or each leading name of a `{...}` group.
fn named_modules(rest: &str) -> Vec<String> {
    let ident = |s: &str| s.chars().take_while(|c| c.is_alphanumeric() || *c == '_').collect::<String>();
    let Some(group) = rest.strip_prefix('{') else {
        return vec![ident(rest)];
    };
    let (mut names, mut depth, mut start) = (Vec::new(), 0usize, true);
    for (at, c) in group.char_indices() {
        match c {
            '{' => depth += 1,
            '}' if depth == 0 => break,
            '}' => depth -= 1,
            ',' if depth == 0 => start = true,
            c if start && (c.is_alphanumeric() || c == '_') => {
                names.push(ident(&group[at..]));
                start = false;
            }
            c if !c.is_whitespace() => start = false,
            _ => {}
        }
    }
    names.retain(|name| name != "self");
    names
}

/// The layering violations in one file, as messages naming the file, the
/// line and the forbidden edge.
fn check_file(relative: &str, text: &str) -> Vec<String> {
    let from = module_of(relative);
    let Some(from_layer) = layer(from) else {
        return vec![format!("src/{relative}: module `{from}` has no row in LAYERS (src/layering_tests.rs): add one")];
    };
    let code = code_only(text);
    let mut found = Vec::new();
    let line_of = |at: usize| code[..at].matches('\n').count() + 1;
    for (at, _) in code.match_indices("crate::") {
        let before = code[..at].chars().next_back();
        if before.is_some_and(|c| c.is_alphanumeric() || c == '_' || c == '$') {
            continue;
        }
        for to in named_modules(&code[at + "crate::".len()..]) {
            if to == from {
                continue;
            }
            let line = line_of(at);
            match layer(&to) {
                None => found.push(format!("src/{relative}:{line}: `crate::{to}` is not in LAYERS: add it")),
                Some(to_layer) => {
                    if let Some(rule) = forbidden(from, &to, from_layer, to_layer) {
                        found.push(format!("src/{relative}:{line}: {from} -> {to} is forbidden: {rule}"));
                    }
                }
            }
        }
    }
    if matches!(from_layer, Layer::Floor | Layer::Neutral) {
        for (at, _) in code.match_indices("rdkafka::") {
            if !code[..at].chars().next_back().is_some_and(|c| c.is_alphanumeric() || c == '_') {
                let line = line_of(at);
                found.push(format!(
                    "src/{relative}:{line}: {from} -> rdkafka is forbidden: the Kafka client belongs to the sink"
                ));
            }
        }
    }
    found
}

fn rust_files(dir: &Path, out: &mut Vec<std::path::PathBuf>) {
    let entries = std::fs::read_dir(dir).unwrap_or_else(|e| panic!("read {}: {e}", dir.display()));
    for entry in entries {
        let path = entry.expect("directory entry").path();
        if path.is_dir() {
            rust_files(&path, out);
        } else if path.extension().is_some_and(|ext| ext == "rs") {
            out.push(path);
        }
    }
}

#[test]
fn imports_follow_the_layering() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files = Vec::new();
    rust_files(&src, &mut files);
    files.sort();
    assert!(files.len() > 20, "found only {} files under {}", files.len(), src.display());
    let mut violations = Vec::new();
    for path in &files {
        let relative = path.strip_prefix(&src).expect("under src").to_string_lossy().replace('\\', "/");
        let text = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("read {}: {e}", path.display()));
        violations.extend(check_file(&relative, &text));
    }
    assert!(violations.is_empty(), "imports against the layering:\n{}", violations.join("\n"));
}

#[test]
fn the_checker_finds_a_forbidden_edge_and_names_file_line_and_edge() {
    let text = "//! A doc naming crate::sink is no import.\n\
                use crate::delivery::InFlight;\n\
                use crate::{hold::Holder, sink::{self, SinkError}};\n\
                fn f() -> String { \"crate::pipeline in a string\".into() }\n\
                fn g() { let _ = crate::sink::probe; let _ = '\"'; }\n";
    let found = check_file("checkpoint/mod.rs", text);
    assert_eq!(
        found,
        vec![
            "src/checkpoint/mod.rs:3: checkpoint -> sink is forbidden: the checkpoint imports no sink: what both need lives in a neutral module (delivery, hold)",
            "src/checkpoint/mod.rs:5: checkpoint -> sink is forbidden: the checkpoint imports no sink: what both need lives in a neutral module (delivery, hold)",
        ],
    );
}

#[test]
fn the_checker_knows_each_rule() {
    let edge = |file: &str, text: &str| check_file(file, text).len();
    assert_eq!(edge("sink/mod.rs", "use crate::codec::Codec;"), 0, "a stage imports an earlier one");
    assert_eq!(edge("source/poll.rs", "use crate::codec::Codec;"), 1, "a stage imports a later one");
    assert_eq!(
        check_file("codec/mod.rs", "use crate::checkpoint::Checkpoint;"),
        vec!["src/codec/mod.rs:1: codec -> checkpoint is forbidden: no stage imports a later one (source -> codec -> sink -> checkpoint); move what both need into a neutral module"],
    );
    assert_eq!(edge("checkpoint/mod.rs", "use crate::codec::Codec;"), 0, "the checkpoint imports an earlier stage");
    assert_eq!(edge("config/mod.rs", "use crate::source::slot;"), 1, "config imports a stage");
    assert_eq!(edge("telemetry/lag.rs", "use crate::store::Store;"), 0, "telemetry imports the store");
    assert_eq!(edge("telemetry/lag.rs", "use crate::pipeline::run;"), 1, "telemetry imports the wiring");
    assert_eq!(edge("delivery.rs", "use crate::sink::Outbound;"), 1, "a neutral module imports a stage");
    assert_eq!(edge("delivery.rs", "use rdkafka::error::KafkaError;"), 1, "a neutral module names Kafka");
    assert_eq!(edge("pipeline.rs", "use crate::{checkpoint, sink, source};"), 0, "the wiring imports anything");
    assert_eq!(edge("cli/replay.rs", "use crate::sink::record;"), 0);
    assert_eq!(edge("fresh.rs", "fn f() {}"), 1, "a module without a row in LAYERS");
    assert_eq!(edge("sink/mod.rs", "use crate::fresh::Thing;"), 1, "an import of a module without a row");
    assert_eq!(edge("sink/mod.rs", "let s = r#\"crate::checkpoint\"#; // crate::pipeline"), 0);
    assert_eq!(edge("sink/mod.rs", "let s = br#\"{\"a\": crate::checkpoint}\"#; use crate::codec::X;"), 0);
    assert_eq!(edge("sink/mod.rs", "fn f<'a>(x: &'a str) -> &'a str { x } use crate::checkpoint::X;"), 1);
    assert_eq!(edge("sink/mod.rs", "let q = ['\\'', '\\\\']; use crate::checkpoint::X;"), 1, "escaped char literals");
    assert_eq!(edge("sink/mod.rs", "/* a /* nested */ crate::checkpoint */ let r#type = 1;"), 0);
}
