//! Whose people stand behind each cell, counted per party.

use super::*;

/// Whom the rows of a cell stand for, party by party.
pub(super) struct People {
    /// Each party's person, linked over that party's own
    /// rows, from whichever of its tables a row holds (they agree where
    /// several do).
    pub(super) parties: Vec<(String, Expr)>,
    /// For each party, the person of each LEFT JOIN's phantom rows that
    /// it owns, with that join's flag.
    pub(super) phantom_persons: Vec<Vec<(Expr, Expr)>>,
    /// For each party, whether it owns the kept side of a LEFT JOIN: its
    /// people are counted on the phantom rows of the cell too.
    pub(super) kept: Vec<bool>,
    /// True on real rows (None: no phantom rows).
    pub(super) real: Option<Expr>,
    pub(super) counting: PeopleCount,
}

impl People {
    pub(super) fn of(
        input: &LogicalPlan,
        phantoms: &[Phantom],
        original: &LogicalPlan,
        owners: Owners<'_>,
        counting: PeopleCount,
    ) -> Result<Self> {
        let tables = leaf_tables(original);
        let owner_of = |c: &Column| -> Result<String> {
            let table = c
                .relation
                .as_ref()
                .and_then(|q| tables.get(&q.to_string()))
                .ok_or_else(|| internal("a person column of no scanned table"))?;
            owners(table).ok_or_else(|| internal("a scanned table no party owns"))
        };
        let person_of = |columns: Vec<Expr>| match columns.as_slice() {
            [one] => one.clone(),
            _ => coalesce(columns),
        };
        // Every party's, the caller's too: a row of the caller's own
        // unmatched customers describes which of them the partner lacks.
        let mut persons: BTreeMap<String, Vec<Expr>> = BTreeMap::new();
        for (q, f) in input.schema().iter() {
            if f.name() == OWN_PERSON_COLUMN {
                let c = Column::new(q.cloned(), OWN_PERSON_COLUMN);
                persons
                    .entry(owner_of(&c)?)
                    .or_default()
                    .push(Expr::Column(c));
            }
        }
        let mut parties = Vec::new();
        let mut phantom_persons = Vec::new();
        let mut kept = Vec::new();
        for (party, columns) in persons {
            let mut theirs_by_join = Vec::new();
            let mut keeps = false;
            for phantom in phantoms {
                for c in &phantom.kept {
                    keeps |= owner_of(c)? == party;
                }
                let mut theirs = Vec::new();
                for c in &phantom.persons {
                    if owner_of(c)? == party {
                        theirs.push(Expr::Column(c.clone()));
                    }
                }
                if !theirs.is_empty() {
                    let unmatched = !Expr::Column(Column::from_name(&phantom.flag));
                    theirs_by_join.push((person_of(theirs), unmatched));
                }
            }
            parties.push((party, person_of(columns)));
            phantom_persons.push(theirs_by_join);
            kept.push(keeps);
        }
        let real = phantoms
            .iter()
            .map(|p| Expr::Column(Column::from_name(&p.flag)))
            .reduce(Expr::and);
        Ok(People {
            parties,
            phantom_persons,
            kept,
            real,
            counting,
        })
    }

    /// The counts of a cell (A and B of every party, aliased; `wide`: the
    /// kept side's people on phantom rows too) and the
    /// predicate over them that it stands for at least `min` people of
    /// each party.
    pub(super) fn counts(&self, min: u32, wide: bool) -> Result<(Vec<Expr>, Expr)> {
        let distinct = self.counting == PeopleCount::Distinct;
        let count = |person: &Expr, filter: Option<Expr>| {
            Expr::AggregateFunction(AggregateFunction::new_udf(
                count_udaf(),
                vec![person.clone()],
                distinct,
                filter.map(Box::new),
                vec![],
                None,
            ))
        };
        let mut counts: Vec<Expr> = Vec::new();
        let mut at_least = |e: Expr| {
            let name = format!("__people_{}", counts.len());
            counts.push(e.alias(&name));
            Expr::Column(Column::from_name(name)).gt_eq(lit(i64::from(min)))
        };
        let mut enough = Vec::new();
        for (((_, person), phantoms), kept) in self
            .parties
            .iter()
            .zip(&self.phantom_persons)
            .zip(&self.kept)
        {
            // The kept side's people, in the first round of
            // [`kept_cells`]: on the phantoms of the cell as well.
            let rows = match wide && *kept {
                true => None,
                false => self.real.clone(),
            };
            let mut party_enough = at_least(count(person, rows));
            for (theirs, unmatched) in phantoms {
                party_enough = party_enough.or(at_least(count(theirs, Some(unmatched.clone()))));
            }
            enough.push(party_enough);
        }
        let enough = enough
            .into_iter()
            .reduce(Expr::and)
            .ok_or_else(|| internal("no party in the query"))?;
        Ok((counts, enough))
    }
}
