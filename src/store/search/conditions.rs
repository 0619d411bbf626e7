//! A search as data: the condition tree a resource must satisfy ([`Condition`]), the order of
//! the results ([`SortBy`]) and a position in them ([`Position`]), gathered in [`SearchSql`].
//! Digests and ranges are computed by the caller; the SQL is [`super::sql`]'s.

use crate::crypto::blind_index::Digest;

/// How a stored range relates to a searched one (search.html#prefix). For dates both are
/// ranges; for numbers the stored value is a point (`low == high`) and the searched range
/// is the implicit precision range of the search value.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RangeOp {
    Eq,
    Ne,
    Gt,
    Lt,
    Ge,
    Le,
    StartsAfter,
    EndsBefore,
    /// Approximately: overlapping the searched range (already widened by the caller).
    Approximately,
}

/// One comparison of a stored value with a searched one.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RangeTest<T> {
    pub op: RangeOp,
    /// The searched range, `[low, high)`.
    pub low: T,
    pub high: T,
}

/// A condition a resource must satisfy. A search is the conjunction of its conditions.
#[derive(Debug, Clone, PartialEq)]
pub enum Condition {
    /// The resource has at least one of these digests.
    HasAny(Vec<Digest>),
    /// The resource has none of these digests.
    HasNone(Vec<Digest>),
    /// The resource has a value for the parameter of one of these presence digests.
    HasParam(Vec<Digest>),
    /// The resource has a value for the parameter of none of these presence digests.
    LacksParam(Vec<Digest>),
    /// A date of `param` passes any of the tests; with `lead`, a date whose row carries one
    /// of those digests (a composite's leading components on the same node).
    Date {
        param: String,
        lead: Option<Vec<Digest>>,
        tests: Vec<RangeTest<i64>>,
    },
    /// A number or quantity of `param` passes any of the tests (with the unit, if given);
    /// `lead` as for dates.
    Number {
        param: String,
        lead: Option<Vec<Digest>>,
        tests: Vec<NumberTest>,
    },
    LastUpdated(Vec<RangeTest<i64>>),
    /// The logical id is one of these.
    Id(Vec<String>),
    /// Any of the conditions holds.
    AnyOf(Vec<Condition>),
    /// Matches nothing (e.g. a chain whose target search found nothing).
    Nothing,
}

#[derive(Debug, Clone, PartialEq)]
pub struct NumberTest {
    pub range: RangeTest<f64>,
    /// The exact value written in the search (for gt/lt/ge/le).
    pub value: f64,
    pub unit: Option<UnitMatch>,
}

/// The searched unit, as its digest on each searched type (units are hashed per type).
#[derive(Debug, Clone, PartialEq)]
pub enum UnitMatch {
    SystemCode(Vec<Digest>),
    Code(Vec<Digest>),
}

/// What results are ordered by.
#[derive(Debug, Clone, PartialEq)]
pub enum SortKey {
    LastUpdated,
    Id,
    /// Earliest start (ascending) or latest end (descending) of a date parameter.
    Date(String),
    /// Smallest (ascending) or largest (descending) value of a number/quantity parameter.
    Number(String),
}

#[derive(Debug, Clone, PartialEq)]
pub struct SortBy {
    pub key: SortKey,
    pub descending: bool,
}

/// A value of a sort key, as carried by a paging cursor.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(untagged)]
pub enum SortValue {
    Int(i64),
    Float(f64),
    Text(String),
}

/// A position in a result list: the sort values and `seq` of the last row of a page.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Position {
    pub values: Vec<SortValue>,
    pub seq: i64,
}

/// One search as the database runs it.
#[derive(Debug, Clone, PartialEq)]
pub struct SearchSql {
    /// Resource types searched; empty means every type.
    pub resource_types: Vec<String>,
    pub conditions: Vec<Condition>,
    pub sort: Vec<SortBy>,
    /// Only rows after this position (before it, when `backward`).
    pub after: Option<Position>,
    /// Walk the order in reverse (for `previous` pages); rows come back reversed.
    pub backward: bool,
}

/// Sort keys a search may combine (the query parser refuses more).
pub const MAX_SORT_KEYS: usize = 3;
