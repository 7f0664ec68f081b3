//! HTTP routes of scripts (`--http 'POST /orders/{id}'`): how one is written and checked,
//! the key that keeps two scripts of a tenant off the same route, and matching a request
//! path against it, path parameters included.

use serde::{Deserialize, Serialize};

/// The methods a route may take.
pub const METHODS: [&str; 5] = ["GET", "POST", "PUT", "PATCH", "DELETE"];

/// The longest route path taken, in bytes.
const MAX_PATH: usize = 512;

crate::domain::named_enum! {
    /// Who may call a route.
    #[derive(Default)]
    pub enum Auth ("http auth") {
        /// A bearer token that may act for the tenant (its own or an operator's).
        #[default]
        Token = "token",
        /// Anyone who reaches the listener; the script decides what to accept.
        Public = "public",
    }
}

/// A script's HTTP route: requests to `/hooks/<tenant><path>` with `method` run it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HttpRoute {
    /// `GET`, `POST`, `PUT`, `PATCH` or `DELETE`.
    pub method: String,
    /// Starts with `/`; a segment `{name}` takes any one segment as parameter `name`, a
    /// last segment `{*name}` the rest of the path.
    pub path: String,
    /// Who may call it.
    #[serde(default)]
    pub auth: Auth,
}

/// One segment of a route's path.
enum Segment<'a> {
    Literal(&'a str),
    Param(&'a str),
    Rest(&'a str),
}

fn segments(path: &str) -> impl Iterator<Item = Segment<'_>> {
    path.trim_start_matches('/').split('/').map(|s| {
        match s.strip_prefix('{').and_then(|s| s.strip_suffix('}')) {
            Some(name) => match name.strip_prefix('*') {
                Some(rest) => Segment::Rest(rest),
                None => Segment::Param(name),
            },
            None => Segment::Literal(s),
        }
    })
}

impl HttpRoute {
    /// Reads `METHOD /path` (the command line's `--http`).
    pub fn parse(text: &str, auth: Auth) -> Result<HttpRoute, String> {
        let (method, path) = text.trim().split_once(' ').ok_or_else(|| {
            format!("{text:?} is not `METHOD /path` (as in `POST /orders/{{id}}`)")
        })?;
        let route = HttpRoute {
            method: method.to_ascii_uppercase(),
            path: path.trim().to_owned(),
            auth,
        };
        route.validate()?;
        Ok(route)
    }

    /// Checks the method and the path: each segment is literal (letters, digits, `-._~`)
    /// or a parameter, parameter names are unique, `{*rest}` comes last.
    pub fn validate(&self) -> Result<(), String> {
        if !METHODS.contains(&self.method.as_str()) {
            return Err(format!(
                "http method {:?} is not one of {}",
                self.method,
                METHODS.join(", ")
            ));
        }
        let path = &self.path;
        if !path.starts_with('/') || path.len() > MAX_PATH {
            return Err(format!(
                "http path {path:?} must start with / and be at most {MAX_PATH} bytes"
            ));
        }
        let all: Vec<Segment> = segments(path).collect();
        let mut names: Vec<&str> = Vec::new();
        for (i, segment) in all.iter().enumerate() {
            let name = match segment {
                Segment::Literal(s) => {
                    let ok = s
                        .bytes()
                        .all(|b| b.is_ascii_alphanumeric() || b"-._~".contains(&b));
                    if !ok || (s.is_empty() && all.len() > 1) {
                        return Err(format!(
                            "http path {path:?}: segment {s:?} may hold only letters, digits and \
                             -._~ (or be a parameter such as {{id}})"
                        ));
                    }
                    continue;
                }
                Segment::Rest(_) if i + 1 != all.len() => {
                    return Err(format!(
                        "http path {path:?}: {{*...}} must be the last segment"
                    ))
                }
                Segment::Param(name) | Segment::Rest(name) => *name,
            };
            let ok =
                !name.is_empty() && name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_');
            if !ok || names.contains(&name) {
                return Err(format!(
                    "http path {path:?}: parameter {name:?} must be a unique name of letters, \
                     digits and _"
                ));
            }
            names.push(name);
        }
        Ok(())
    }

    /// What two routes of one tenant may not share: the method and the path with its
    /// parameters unnamed (`POST /orders/{}`).
    pub fn key(&self) -> String {
        let shape: Vec<String> = segments(&self.path)
            .map(|s| match s {
                Segment::Literal(l) => l.to_owned(),
                Segment::Param(_) => "{}".to_owned(),
                Segment::Rest(_) => "{*}".to_owned(),
            })
            .collect();
        format!("{} /{}", self.method, shape.join("/"))
    }

    /// The parameters of `path` if it matches, and how specific the match is (literal
    /// segments count most, so `/orders/new` wins over `/orders/{id}`).
    pub fn matches(
        &self,
        path: &str,
    ) -> Option<(serde_json::Map<String, serde_json::Value>, usize)> {
        let mut params = serde_json::Map::new();
        let mut given = path.trim_start_matches('/').split('/');
        let mut score = 0;
        for segment in segments(&self.path) {
            match segment {
                Segment::Literal(l) => {
                    if given.next()? != l {
                        return None;
                    }
                    score += 2;
                }
                Segment::Param(name) => {
                    let value = given.next().filter(|v| !v.is_empty())?;
                    params.insert(name.to_owned(), decoded(value).into());
                    score += 1;
                }
                Segment::Rest(name) => {
                    let rest: Vec<&str> = given.by_ref().collect();
                    params.insert(name.to_owned(), decoded(&rest.join("/")).into());
                }
            }
        }
        given.next().is_none().then_some((params, score))
    }
}

impl std::fmt::Display for HttpRoute {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} {}", self.method, self.path)
    }
}

/// A path segment with its percent-escapes decoded (kept as given if they are not UTF-8).
fn decoded(segment: &str) -> String {
    percent_encoding::percent_decode_str(segment)
        .decode_utf8()
        .map(|s| s.into_owned())
        .unwrap_or_else(|_| segment.to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn route(text: &str) -> HttpRoute {
        HttpRoute::parse(text, Auth::Token).unwrap()
    }

    #[test]
    fn routes_match_literals_parameters_and_the_rest() {
        let r = route("post /orders/{id}/lines/{line}");
        assert_eq!(r.method, "POST");
        let (params, _) = r.matches("/orders/42/lines/a%20b").unwrap();
        assert_eq!(params["id"], "42");
        assert_eq!(params["line"], "a b");
        assert!(r.matches("/orders/42/lines").is_none());
        assert!(r.matches("/orders/42/lines/1/extra").is_none());
        assert!(r.matches("/orders//lines/1").is_none());
        let files = route("GET /files/{*path}");
        assert_eq!(
            files.matches("/files/a/b.txt").unwrap().0["path"],
            "a/b.txt"
        );
        let (_, literal) = route("GET /orders/new").matches("/orders/new").unwrap();
        let (_, param) = route("GET /orders/{id}").matches("/orders/new").unwrap();
        assert!(literal > param);
    }

    #[test]
    fn routes_are_checked_and_keyed_without_parameter_names() {
        for bad in [
            "GET orders",
            "FETCH /x",
            "GET /a b",
            "GET /{id}/{id}",
            "GET /{*rest}/x",
            "GET /{}",
            "GET /a//b",
            "/x",
        ] {
            assert!(HttpRoute::parse(bad, Auth::Token).is_err(), "{bad}");
        }
        assert_eq!(route("GET /").key(), "GET /");
        assert_eq!(route("GET /o/{id}").key(), route("GET /o/{n}").key());
        assert_ne!(route("GET /o/{id}").key(), route("PUT /o/{id}").key());
    }
}
