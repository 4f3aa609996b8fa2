//! Size limits on a query, checked on its tokens before it is parsed into a
//! tree: a deep or huge expression would otherwise overflow a thread's
//! stack somewhere in parsing, planning or checking, and take the whole
//! server down with it.
//!
//! Two measures, both computed in one loop without recursion:
//! - tokens: every word, literal and operator (whitespace and comments
//!   aside), at most [`MAX_TOKENS`];
//! - depth: an upper bound of the expression tree's depth. Each
//!   parenthesis opens a level; within a level every operator (`+`, `=`,
//!   `AND`, `NOT`, `BETWEEN`, ...) may add one more node above what came
//!   before, so the bound is the sum, over the open levels, of their
//!   operators so far plus one. A comma or a clause keyword (`WHERE`,
//!   `GROUP BY`, ...) starts a new expression at its level. At most
//!   [`MAX_DEPTH`].

use datafusion::sql::sqlparser::dialect::GenericDialect;
use datafusion::sql::sqlparser::keywords::Keyword;
use datafusion::sql::sqlparser::tokenizer::{Token, Tokenizer};

use super::Violation;

/// Words, literals and operators a query may hold.
pub const MAX_TOKENS: usize = 8_192;
/// Bound on the depth of any expression tree in a query.
pub const MAX_DEPTH: usize = 256;

fn limit(detail: String) -> Violation {
    Violation::invalid("sql.limits", detail)
}

/// Refuses a query past the token or depth limit.
pub(super) fn check_size(sql: &str) -> Result<(), Violation> {
    let tokens = Tokenizer::new(&GenericDialect {}, sql)
        .tokenize()
        .map_err(|e| super::syntax_error(&e.to_string()))?;
    let mut count = 0usize;
    // Operators so far in each open level; the depth bound is the sum of
    // (operators + 1) over the levels.
    let mut levels: Vec<usize> = vec![0];
    let mut depth = 1usize;
    for token in &tokens {
        match token {
            Token::Whitespace(_) | Token::EOF => continue,
            _ => count += 1,
        }
        if count > MAX_TOKENS {
            return Err(limit(format!(
                "the query holds more than {MAX_TOKENS} words, literals and operators (limit sql.max_tokens)"
            )));
        }
        match token {
            Token::LParen | Token::LBracket | Token::LBrace => {
                levels.push(0);
                depth += 1;
            }
            Token::RParen | Token::RBracket | Token::RBrace => {
                if levels.len() > 1
                    && let Some(ops) = levels.pop()
                {
                    depth -= ops + 1;
                }
            }
            Token::Comma | Token::SemiColon => restart(&mut levels, &mut depth),
            Token::Word(w) if starts_clause(w.keyword) => restart(&mut levels, &mut depth),
            Token::Word(w) if is_operator_word(w.keyword) => bump(&mut levels, &mut depth),
            Token::Word(_)
            | Token::Number(..)
            | Token::SingleQuotedString(_)
            | Token::DoubleQuotedString(_)
            | Token::NationalStringLiteral(_)
            | Token::EscapedStringLiteral(_)
            | Token::HexStringLiteral(_)
            | Token::Placeholder(_)
            | Token::Period => {}
            // Every other symbol is an operator of some kind.
            _ => bump(&mut levels, &mut depth),
        }
        if depth > MAX_DEPTH {
            return Err(limit(format!(
                "the query nests expressions deeper than {MAX_DEPTH} levels (limit sql.max_depth)"
            )));
        }
    }
    Ok(())
}

fn bump(levels: &mut [usize], depth: &mut usize) {
    if let Some(ops) = levels.last_mut() {
        *ops += 1;
        *depth += 1;
    }
}

fn restart(levels: &mut [usize], depth: &mut usize) {
    if let Some(ops) = levels.last_mut() {
        *depth -= *ops;
        *ops = 0;
    }
}

fn is_operator_word(k: Keyword) -> bool {
    matches!(
        k,
        Keyword::AND
            | Keyword::OR
            | Keyword::NOT
            | Keyword::IS
            | Keyword::BETWEEN
            | Keyword::LIKE
            | Keyword::ILIKE
            | Keyword::IN
            | Keyword::CASE
            | Keyword::WHEN
            | Keyword::THEN
            | Keyword::ELSE
            | Keyword::CAST
            | Keyword::TRY_CAST
            | Keyword::DISTINCT
            | Keyword::EXISTS
            | Keyword::DIV
    )
}

fn starts_clause(k: Keyword) -> bool {
    matches!(
        k,
        Keyword::SELECT
            | Keyword::FROM
            | Keyword::WHERE
            | Keyword::GROUP
            | Keyword::HAVING
            | Keyword::ORDER
            | Keyword::LIMIT
            | Keyword::OFFSET
            | Keyword::JOIN
            | Keyword::ON
            | Keyword::USING
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ordinary_queries_pass_and_deep_or_huge_ones_do_not() {
        let ordinary = "SELECT c.region, a.interest_segment, COUNT(*), SUM(a.spend) / COUNT(*) \
             FROM customers c JOIN audience a ON c.email = a.email AND c.phone = a.phone \
             WHERE (c.region = 'north' OR c.region = 'south') AND NOT a.interest_segment IN ('x', 'y') \
             GROUP BY c.region, a.interest_segment HAVING COUNT(*) > 10 ORDER BY 3 DESC LIMIT 5";
        check_size(ordinary).unwrap();
        let conditions = vec!["c.region = 'north'"; 60].join(" AND ");
        check_size(&format!("SELECT COUNT(*) FROM t WHERE {conditions}")).unwrap();
        let list = vec!["'x'"; 2_000].join(", ");
        check_size(&format!("SELECT COUNT(*) FROM t WHERE r IN ({list})")).unwrap();

        let rule = |sql: &str| check_size(sql).unwrap_err().to_string();
        let chain = vec!["1"; 300].join(" + ");
        assert!(rule(&format!("SELECT {chain}")).contains("sql.max_depth"));
        let nested = format!("SELECT {}1{}", "(".repeat(300), ")".repeat(300));
        assert!(rule(&nested).contains("sql.max_depth"));
        let nots = format!("SELECT COUNT(*) FROM t WHERE {}x", "NOT ".repeat(300));
        assert!(rule(&nots).contains("sql.max_depth"));
        let list = vec!["'x'"; 5_000].join(", ");
        assert!(rule(&format!("SELECT 1 FROM t WHERE r IN ({list})")).contains("sql.max_tokens"));
        // Unbalanced closing parentheses do not underflow.
        check_size("SELECT 1))))").unwrap();
    }
}
