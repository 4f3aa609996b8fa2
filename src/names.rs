//! Pointing at the analyst's own words: where a name sits in their SQL,
//! and which allowed name they most likely meant.
//!
//! Only names are ever echoed (columns, tables, functions, templates,
//! parameters), and only when they look like names: a value the analyst
//! typed, or anything the server holds, never is.

use datafusion::sql::sqlparser::dialect::GenericDialect;
use datafusion::sql::sqlparser::tokenizer::{Token, Tokenizer};

/// The longest name echoed back.
const MAX_NAME: usize = 64;

/// Whether `s` is a plain SQL name (letters, digits, underscores, not
/// starting with a digit), and so safe to echo.
pub fn is_plain_name(s: &str) -> bool {
    let mut chars = s.chars();
    matches!(chars.next(), Some(c) if c.is_ascii_alphabetic() || c == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_')
        && s.len() <= MAX_NAME
}

/// Whether every dot-separated part of `s` is a plain name.
pub fn is_plain_path(s: &str) -> bool {
    !s.is_empty() && s.split('.').all(is_plain_name)
}

/// A place in a text: 1-based line and column.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Position {
    pub line: u64,
    pub column: u64,
}

impl std::fmt::Display for Position {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "line {}, column {}", self.line, self.column)
    }
}

/// Where the dotted name `path` (as `c.region` or `region`) first occurs
/// in `sql` as words, compared without case.
pub fn locate(sql: &str, path: &str) -> Option<Position> {
    let parts: Vec<&str> = path.split('.').collect();
    let tokens = Tokenizer::new(&GenericDialect {}, sql)
        .tokenize_with_location()
        .ok()?;
    let words: Vec<&_> = tokens
        .iter()
        .filter(|t| !matches!(t.token, Token::Whitespace(_)))
        .collect();
    // The path's words alternate with periods: `a . b . c`.
    let span = parts.len() * 2 - 1;
    (0..words.len().saturating_sub(span - 1)).find_map(|start| {
        let fits = (0..span).all(|i| {
            let token = &words[start + i].token;
            match i % 2 {
                0 => matches!(token, Token::Word(w) if w.value.eq_ignore_ascii_case(parts[i / 2])),
                _ => matches!(token, Token::Period),
            }
        });
        fits.then(|| Position {
            line: words[start].span.start.line,
            column: words[start].span.start.column,
        })
    })
}

/// The position a parser or tokenizer message gives ("... at Line: 3,
/// Column: 14"); nothing else of the message is used.
pub fn position_in_message(message: &str) -> Option<Position> {
    let rest = &message[message.rfind("Line: ")? + "Line: ".len()..];
    let (line, rest) = rest.split_once(", Column: ")?;
    let column: String = rest.chars().take_while(char::is_ascii_digit).collect();
    Some(Position {
        line: line.trim().parse().ok()?,
        column: column.parse().ok()?,
    })
}

/// The candidate nearest to `asked` by edit distance, when near enough to
/// be a slip (at most a third of the name's letters, at least one) and not
/// `asked` itself.
pub fn nearest<'a>(asked: &str, candidates: impl IntoIterator<Item = &'a str>) -> Option<String> {
    let asked_lower = asked.to_ascii_lowercase();
    let allowed = (asked.chars().count() / 3).max(1);
    candidates
        .into_iter()
        .filter(|c| !c.eq_ignore_ascii_case(asked))
        .map(|c| (edit_distance(&asked_lower, &c.to_ascii_lowercase()), c))
        .filter(|(d, _)| *d <= allowed)
        .min_by(|a, b| a.0.cmp(&b.0).then_with(|| a.1.cmp(b.1)))
        .map(|(_, c)| c.to_string())
}

/// Levenshtein distance with adjacent transpositions counted as one edit.
fn edit_distance(a: &str, b: &str) -> usize {
    let (a, b): (Vec<char>, Vec<char>) = (a.chars().collect(), b.chars().collect());
    let mut rows = vec![vec![0usize; b.len() + 1]; a.len() + 1];
    for (i, row) in rows.iter_mut().enumerate() {
        row[0] = i;
    }
    for (j, cell) in rows[0].iter_mut().enumerate() {
        *cell = j;
    }
    for i in 1..=a.len() {
        for j in 1..=b.len() {
            let cost = usize::from(a[i - 1] != b[j - 1]);
            let mut best = (rows[i - 1][j] + 1)
                .min(rows[i][j - 1] + 1)
                .min(rows[i - 1][j - 1] + cost);
            if i > 1 && j > 1 && a[i - 1] == b[j - 2] && a[i - 2] == b[j - 1] {
                best = best.min(rows[i - 2][j - 2] + 1);
            }
            rows[i][j] = best;
        }
    }
    rows[a.len()][b.len()]
}

/// "; did you mean X?" when there is a near name, else nothing.
pub fn did_you_mean(suggestion: Option<&str>) -> String {
    suggestion
        .map(|s| format!("; did you mean {s}?"))
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_found_where_the_analyst_wrote_them() {
        let sql = "SELECT c.region,\n  SUM(a.spend)\nFROM customers c JOIN audience a ON c.email = a.email";
        assert_eq!(
            locate(sql, "a.spend"),
            Some(Position { line: 2, column: 7 })
        );
        assert_eq!(
            locate(sql, "AUDIENCE"),
            Some(Position {
                line: 3,
                column: 23
            })
        );
        assert_eq!(locate(sql, "c.spend"), None);
        // A name inside a string literal is not a name.
        assert_eq!(
            locate("SELECT 'region' , region", "region").unwrap().column,
            19
        );
    }

    #[test]
    fn parser_positions_are_read_and_nothing_else() {
        assert_eq!(
            position_in_message(
                "sql parser error: Expected: end of statement, found: 'x' at Line: 3, Column: 14"
            ),
            Some(Position {
                line: 3,
                column: 14
            })
        );
        assert_eq!(position_in_message("no position"), None);
    }

    #[test]
    fn the_nearest_allowed_name_is_suggested_when_near() {
        let columns = ["region", "age_band", "lifetime_value", "email"];
        assert_eq!(nearest("regoin", columns).as_deref(), Some("region"));
        assert_eq!(
            nearest("lifetime_vlaue", columns).as_deref(),
            Some("lifetime_value")
        );
        assert_eq!(nearest("agebands", columns).as_deref(), Some("age_band"));
        assert_eq!(nearest("income", columns), None);
        assert_eq!(nearest("region", columns), None);
        assert_eq!(edit_distance("abc", "acb"), 1);
        assert_eq!(edit_distance("", "abc"), 3);
    }

    #[test]
    fn only_plain_names_are_echoed() {
        assert!(is_plain_name("lifetime_value"));
        assert!(is_plain_path("c.lifetime_value"));
        for bad in [
            "jane@example.com",
            "1abc",
            "a b",
            "",
            "x'; DROP",
            &"a".repeat(65),
        ] {
            assert!(!is_plain_name(bad), "{bad}");
        }
        assert!(!is_plain_path("c."));
    }
}
