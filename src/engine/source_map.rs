//! Failure positions of scripts compiled from another language (TypeScript): the compiled
//! JavaScript ends with its source map, inline, and a failure's message and stack are
//! rewritten from the JavaScript's lines and columns to the original's.

use base64::Engine as _;

/// What the compiled JavaScript ends with, before the base64 of its source map.
pub const INLINE_MAP: &str = "\n//# sourceMappingURL=data:application/json;base64,";

/// The file extension failures name for a compiled script (`greet@v3.ts`).
pub const ORIGINAL_EXTENSION: &str = "ts";

/// The name of the original in source maps. deno_core applies an inline map itself when it
/// builds an error's stack and names the original by it; failures then get the module's
/// own name back (`greet@v3.ts`), which the compile cannot know (the version comes later).
pub const ORIGINAL: &str = "file:///script.ts";

/// `source` with `map` (a source map, JSON) appended inline.
pub fn with_inline_map(source: &str, map: &str) -> String {
    let encoded = base64::engine::general_purpose::STANDARD.encode(map);
    format!("{source}{INLINE_MAP}{encoded}\n")
}

/// The source map inline at the end of `source`, if it has one.
fn inline_map(source: &str) -> Option<deno_ast::swc::sourcemap::SourceMap> {
    let at = source.rfind(INLINE_MAP)?;
    let encoded = source[at + INLINE_MAP.len()..].trim_end();
    let json = base64::engine::general_purpose::STANDARD
        .decode(encoded)
        .ok()?;
    deno_ast::swc::sourcemap::SourceMap::from_slice(&json).ok()
}

/// Rewrites every `<file>.js:LINE:COLUMN` in `text` (`file` is the module's name without
/// its extension, e.g. `greet@v3`) to the original's `<file>.ts:LINE:COLUMN`. Lines and
/// columns are 1-based, as engines print them. A position the map does not cover keeps
/// its JavaScript line and column but still names the original file, so the reader is
/// never sent to a file that does not exist.
fn rewrite(text: &str, file: &str, map: &deno_ast::swc::sourcemap::SourceMap) -> String {
    let needle = format!("{file}.js:");
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(at) = rest.find(&needle) {
        out.push_str(&rest[..at]);
        let after = &rest[at + needle.len()..];
        let (line, tail) = number(after);
        let position = line.and_then(|line| {
            let tail = tail.strip_prefix(':')?;
            let (column, tail) = number(tail);
            Some((line, column?, tail))
        });
        match position {
            Some((line, column, tail)) => {
                let (line, column) = map
                    .lookup_token(line.saturating_sub(1), column.saturating_sub(1))
                    .filter(|t| t.get_src_line() != u32::MAX)
                    .map(|t| (t.get_src_line() + 1, t.get_src_col() + 1))
                    .unwrap_or((line, column));
                out.push_str(&format!("{file}.{ORIGINAL_EXTENSION}:{line}:{column}"));
                rest = tail;
            }
            None => {
                out.push_str(&needle);
                rest = after;
            }
        }
    }
    out.push_str(rest);
    out
}

/// The decimal number `text` starts with, and what follows it.
fn number(text: &str) -> (Option<u32>, &str) {
    let digits = text.bytes().take_while(u8::is_ascii_digit).count();
    (text[..digits].parse().ok(), &text[digits..])
}

/// Maps `failure`'s positions in module `file` back to the original source, when `source`
/// carries an inline source map; does nothing for plain JavaScript. Positions the engine
/// mapped already are renamed to `<file>.ts`; those it left in the JavaScript are mapped.
pub fn map_failure(source: &str, file: &str, failure: &mut super::Failure) {
    let Some(map) = inline_map(source) else {
        return;
    };
    let named = format!("{file}.{ORIGINAL_EXTENSION}:");
    let fix = |text: &str| rewrite(&text.replace(&format!("{ORIGINAL}:"), &named), file, &map);
    failure.message = fix(&failure.message);
    if let Some(stack) = &failure.stack {
        failure.stack = Some(fix(stack));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::FailureKind;

    fn failure(stack: &str) -> super::super::Failure {
        super::super::Failure {
            kind: FailureKind::Exception,
            message: "boom at x@v1.js:2:1".into(),
            stack: Some(stack.into()),
            retryable: true,
        }
    }

    #[test]
    fn positions_in_the_javascript_and_the_engines_own_go_to_the_original() {
        // Generated line 1 is original line 1; generated line 2 is original line 3, column 5.
        let map =
            r#"{"version":3,"sources":["file:///script.ts"],"names":[],"mappings":"AAAA;AAEI"}"#;
        let source = with_inline_map("a;\nb;", map);
        let mut f =
            failure("at f (x@v1.js:2:1)\nat g (file:///script.ts:7:2)\nat h (other.js:2:1)");
        map_failure(&source, "x@v1", &mut f);
        assert_eq!(f.message, "boom at x@v1.ts:3:5");
        assert_eq!(
            f.stack.as_deref(),
            Some("at f (x@v1.ts:3:5)\nat g (x@v1.ts:7:2)\nat h (other.js:2:1)")
        );
    }

    #[test]
    fn plain_javascript_is_left_alone() {
        let mut f = failure("at f (x@v1.js:2:1)");
        map_failure("export default () => 1;", "x@v1", &mut f);
        assert_eq!(f.stack.as_deref(), Some("at f (x@v1.js:2:1)"));
    }
}
