//! A refusal: the rule broken, where, and what to do instead.

use crate::names::Position;

/// Why a query was refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Violation {
    /// True for a policy refusal (PERMISSION_DENIED), false for malformed
    /// SQL (INVALID_ARGUMENT).
    pub policy: bool,
    pub rule: &'static str,
    pub detail: String,
    /// Where in the analyst's SQL the refusal points, when known.
    pub at: Option<Position>,
    /// The analyst's own name the refusal is about (a column, table,
    /// function, template or parameter), and the nearest allowed name.
    pub name: Option<String>,
    pub suggestion: Option<String>,
}

impl std::fmt::Display for Violation {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "rule {}: {}", self.rule, self.detail)?;
        match self.at {
            Some(at) => write!(f, " (at {at})"),
            None => Ok(()),
        }
    }
}

impl Violation {
    /// A policy refusal (PERMISSION_DENIED).
    pub fn deny(rule: &'static str, detail: impl Into<String>) -> Violation {
        Violation {
            policy: true,
            rule,
            detail: detail.into(),
            at: None,
            name: None,
            suggestion: None,
        }
    }

    /// Malformed SQL or request (INVALID_ARGUMENT).
    pub fn invalid(rule: &'static str, detail: impl Into<String>) -> Violation {
        Violation {
            policy: false,
            ..Violation::deny(rule, detail)
        }
    }

    /// The same refusal, pointing at a place in the SQL.
    pub fn at(mut self, at: Option<Position>) -> Violation {
        self.at = at;
        self
    }

    /// The same refusal about the analyst's name `name` (echoed only when
    /// it is a plain name), with the nearest allowed name.
    pub fn about(mut self, name: &str, suggestion: Option<String>) -> Violation {
        if crate::names::is_plain_path(name) {
            self.name = Some(name.to_string());
        }
        self.suggestion = suggestion;
        self
    }
}

pub(crate) fn deny(rule: &'static str, detail: impl Into<String>) -> Violation {
    Violation::deny(rule, detail)
}
