//! TypeScript scripts: the language of a script file, and the one-time compile at deploy
//! (and `scripts test`/`validate`) that strips types with deno_ast and keeps an inline
//! source map, so runs execute plain JavaScript and failures point at TypeScript lines.

use std::path::Path;
use std::sync::Arc;

use deno_ast::{EmitOptions, MediaType, ModuleSpecifier, ParseParams, SourceMapOption};

use crate::engine::source_map::{with_inline_map, ORIGINAL};

/// What `scriptd types` prints: declarations of `event`, `ctx`, the fetch subset and the
/// API's error names.
pub const DECLARATIONS: &str = include_str!("scriptd.d.ts");

/// The language a script is written in.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Lang {
    /// JavaScript (an ES module), run as written.
    #[default]
    Js,
    /// TypeScript, compiled to JavaScript once when it is loaded.
    Ts,
}

impl Lang {
    /// `given` if set, else from the file's extension (`.ts`, `.mts`: TypeScript).
    pub fn of(path: &Path, given: Option<Lang>) -> Lang {
        given.unwrap_or_else(|| match path.extension().and_then(|e| e.to_str()) {
            Some("ts" | "mts") => Lang::Ts,
            _ => Lang::Js,
        })
    }
}

/// A script ready to run: the JavaScript the engine executes and, for TypeScript, the
/// original.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Compiled {
    /// JavaScript; compiled from TypeScript, it ends with an inline source map.
    pub javascript: String,
    /// The TypeScript it was compiled from.
    pub typescript: Option<String>,
}

/// A syntax error at a 1-based line and column of the original.
#[derive(Debug, thiserror::Error)]
#[error("{file}:{line}:{column}: {message}")]
pub struct SyntaxError {
    /// The file, as the user named it (empty for source given without one).
    pub file: String,
    pub line: usize,
    pub column: usize,
    pub message: String,
}

/// Compiles `source` written in `lang`. JavaScript is returned as it is (the engine
/// reports its syntax errors when it loads it).
pub fn compile(source: String, lang: Lang) -> Result<Compiled, SyntaxError> {
    match lang {
        Lang::Js => Ok(Compiled {
            javascript: source,
            typescript: None,
        }),
        Lang::Ts => Ok(Compiled {
            javascript: transpile(&source)?,
            typescript: Some(source),
        }),
    }
}

/// Reads the script at `path` and compiles it; errors name the file, and a syntax error
/// its line and column (`greet.ts:3:14: Expected ';', got 'x'`).
pub fn load(path: &Path, lang: Option<Lang>) -> anyhow::Result<Compiled> {
    let source = std::fs::read_to_string(path)
        .map_err(|e| anyhow::anyhow!("reading the script {}: {e}", path.display()))?;
    compile(source, Lang::of(path, lang)).map_err(|e| {
        anyhow::Error::new(SyntaxError {
            file: path.display().to_string(),
            ..e
        })
    })
}

/// Type-strips TypeScript into JavaScript with deno_ast (swc): type annotations, interfaces,
/// type-only imports go; enums, namespaces and parameter properties become JavaScript.
/// Nothing is type-checked.
fn transpile(source: &str) -> Result<String, SyntaxError> {
    let specifier = ModuleSpecifier::parse(ORIGINAL).expect("a valid URL");
    let at = |diagnostic: &deno_ast::ParseDiagnostic| {
        let position = diagnostic.display_position();
        SyntaxError {
            file: String::new(),
            line: position.line_number,
            column: position.column_number,
            message: diagnostic.kind().msg().into_owned(),
        }
    };
    let parsed = deno_ast::parse_module(ParseParams {
        specifier,
        text: Arc::from(source),
        media_type: MediaType::TypeScript,
        capture_tokens: false,
        scope_analysis: false,
        maybe_syntax: None,
    })
    .map_err(|d| at(&d))?;
    // Errors the parser recovered from are still errors.
    if let Some(first) = parsed.diagnostics().first() {
        return Err(at(first));
    }
    let emitted = parsed
        .transpile(
            &deno_ast::TranspileOptions::default(),
            &deno_ast::TranspileModuleOptions::default(),
            &EmitOptions {
                source_map: SourceMapOption::Separate,
                inline_sources: false,
                ..Default::default()
            },
        )
        .map_err(|e| SyntaxError {
            file: String::new(),
            line: 1,
            column: 1,
            message: e.to_string(),
        })?
        .into_source();
    Ok(match emitted.source_map {
        Some(map) => with_inline_map(&emitted.text, &map),
        None => emitted.text,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn types_go_and_the_javascript_keeps_a_map() {
        let compiled = compile(
            "interface Order { id: string }\nexport default (e: { data: Order }): string => e.data.id;\n".into(),
            Lang::Ts,
        )
        .unwrap();
        assert!(
            !compiled.javascript.contains("interface"),
            "{}",
            compiled.javascript
        );
        assert!(
            compiled
                .javascript
                .starts_with("export default ((e)=>e.data.id);"),
            "{}",
            compiled.javascript
        );
        assert!(compiled
            .javascript
            .contains(crate::engine::source_map::INLINE_MAP));
        assert!(compiled.typescript.unwrap().starts_with("interface"));
    }

    #[test]
    fn syntax_errors_name_their_line_and_column() {
        let e = compile("const a: number = 1;\nconst b = (;\n".into(), Lang::Ts).unwrap_err();
        assert_eq!((e.line, e.column), (2, 12), "{e}");
    }

    #[test]
    fn the_language_comes_from_the_extension_unless_given() {
        assert_eq!(Lang::of(Path::new("a.ts"), None), Lang::Ts);
        assert_eq!(Lang::of(Path::new("a.js"), None), Lang::Js);
        assert_eq!(Lang::of(Path::new("-"), Some(Lang::Ts)), Lang::Ts);
    }
}
