//! Parsing of FHIR search requests (search.html) into [`SearchRequest`]: which parameters,
//! modifiers, prefixes and values, and the result controls (`_count`, `_sort`, `_include`
//! …). Strict by default: an unknown or unsupported parameter, modifier or malformed value
//! is an error naming the parameter; in lenient mode (`Prefer: handling=lenient`) unknown
//! and unsupported parameters are dropped and reported, malformed values of known ones are
//! still errors.

use std::collections::BTreeMap;

use super::search_params::{ParamType, SearchParamRegistry};
use super::search_values::{date_range, number_range};

/// Default and largest page size.
pub const DEFAULT_COUNT: usize = 50;
pub const MAX_COUNT: usize = 1000;
/// Most parameters of one search: each is a condition of one SQL statement, whose
/// expression depth and bound values the databases limit.
pub const MAX_PARAMETERS: usize = 100;
/// Most comma-separated values of one parameter.
pub const MAX_VALUES: usize = 1000;
/// Sort keys one search may combine.
pub const MAX_SORT_KEYS: usize = 3;
/// Most resources a chain or `_has` may resolve to before the search is refused as too
/// broad (their ids become conditions of the outer search).
pub const MAX_INNER_MATCHES: i64 = 1000;

/// Parameters that control results rather than filter them.
const RESULT_PARAMS: &[&str] = &[
    "_count",
    "_totalMethod",
    "_sort",
    "_total",
    "_summary",
    "_elements",
    "_include",
    "_revinclude",
    "_format",
    "_pretty",
    "_cursor",
];

/// Which parameters the server can search, per type.
pub trait SupportedParams {
    /// The type of parameter `code` on `resource_type`, if the server indexes it.
    fn supported(&self, resource_type: &str, code: &str) -> Option<ParamType>;

    /// The component types of composite `code` on `resource_type`, in order, if the server
    /// indexes it.
    fn components(&self, resource_type: &str, code: &str) -> Option<Vec<ParamType>>;
}

/// A malformed or unsupported search.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct SearchError {
    /// The parameter at fault, as written.
    pub parameter: String,
    pub message: String,
}

impl SearchError {
    /// A refusal of `parameter` (as written, cut to 64 characters) saying why.
    pub fn new(parameter: &str, message: impl Into<String>) -> Self {
        Self {
            parameter: parameter.chars().take(64).collect(),
            message: message.into(),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Prefix {
    Eq,
    Ne,
    Gt,
    Lt,
    Ge,
    Le,
    Sa,
    Eb,
    Ap,
}

/// One value of a filter (values of one parameter separated by commas are alternatives).
#[derive(Debug, Clone, PartialEq)]
pub enum FilterValue {
    /// String: the text (normalized by the engine).
    String(String),
    /// Token: `[system|]code`; `system` is `Some("")` for `|code` (no system).
    Token {
        system: Option<String>,
        code: Option<String>,
    },
    /// Reference: a literal reference (`Type/id`, an id, or an absolute URL).
    Reference(String),
    Uri(String),
    Date {
        prefix: Prefix,
        low: i64,
        high: i64,
    },
    Number {
        prefix: Prefix,
        value: f64,
        low: f64,
        high: f64,
    },
    Quantity {
        prefix: Prefix,
        value: f64,
        low: f64,
        high: f64,
        system: Option<String>,
        code: Option<String>,
    },
    /// `:missing=true|false`.
    Missing(bool),
    /// A composite's tuple (search.html#composite): one value per component, in order,
    /// that must all hold on the same node.
    Composite(Vec<FilterValue>),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Modifier {
    None,
    Exact,
    Not,
    Missing,
    /// `subject:Patient=…`: a reference to this type.
    Type,
}

/// A filter on one parameter.
#[derive(Debug, Clone, PartialEq)]
pub struct Filter {
    pub code: String,
    pub param_type: ParamType,
    pub modifier: Modifier,
    /// For [`Modifier::Type`] and chains: the target type.
    pub target_type: Option<String>,
    /// Alternatives (OR).
    pub values: Vec<FilterValue>,
}

/// One search criterion (criteria are ANDed).
#[derive(Debug, Clone, PartialEq)]
pub enum Criterion {
    Filter(Filter),
    /// `_id`.
    Id(Vec<String>),
    /// `_lastUpdated`.
    LastUpdated(Vec<FilterValue>),
    /// `ref:Type.param=value`: resources whose reference `ref` points at a `Type` matching
    /// the inner filter.
    Chain {
        reference: String,
        target_types: Vec<String>,
        inner: Box<Criterion>,
    },
    /// `_has:Type:ref:param=value`: resources referenced through `ref` by a `Type` matching
    /// the inner filter.
    Has {
        source_type: String,
        reference: String,
        inner: Box<Criterion>,
    },
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SortParam {
    pub code: String,
    pub param_type: Option<ParamType>,
    pub descending: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TotalMode {
    None,
    Accurate,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Summary {
    Count,
    /// `_summary=false`: the full resources (the default).
    False,
}

/// `_include` / `_revinclude`: `Source:param[:Target]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Include {
    pub source_type: String,
    pub param: String,
    pub target_type: Option<String>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct SearchRequest {
    /// The types searched (one for type-level search; `_type` or all for system level).
    pub resource_types: Vec<String>,
    pub criteria: Vec<Criterion>,
    pub count: usize,
    pub sort: Vec<SortParam>,
    pub total: TotalMode,
    pub summary: Summary,
    pub elements: Vec<String>,
    pub includes: Vec<Include>,
    pub revincludes: Vec<Include>,
    /// Paging cursor from a `next` link.
    pub cursor: Option<String>,
    /// The parameters that define the search, as they appear in `self`/`next` links
    /// (without `_cursor` and without ignored ones).
    pub link_params: Vec<(String, String)>,
    /// Parameters ignored in lenient mode.
    pub ignored: Vec<String>,
    /// The patients whose compartments the search is confined to: set by the service from
    /// the token's grant (a `patient/` scope, Consent), never by the query.
    pub compartments: Option<Vec<String>>,
    /// The patient whose compartment the client searches (`GET /Patient/{id}/{type}`,
    /// search.html#compartments): set from the path, never from the query.
    pub in_compartment: Option<String>,
    /// The same as `compartments` for each `_revinclude` source type the token may search (absent: one it may
    /// not, whose resources are not looked for).
    pub revinclude_compartments: BTreeMap<String, Option<Vec<String>>>,
}

impl SearchRequest {
    /// A search over `resource_types` with no criteria and the defaults of every result
    /// parameter (R4 search.html).
    pub fn over(resource_types: Vec<String>) -> Self {
        Self {
            resource_types,
            criteria: Vec::new(),
            count: DEFAULT_COUNT,
            sort: Vec::new(),
            total: TotalMode::Accurate,
            summary: Summary::False,
            elements: Vec::new(),
            includes: Vec::new(),
            revincludes: Vec::new(),
            cursor: None,
            link_params: Vec::new(),
            ignored: Vec::new(),
            compartments: None,
            in_compartment: None,
            revinclude_compartments: BTreeMap::new(),
        }
    }
}

/// How strictly to treat parameters the server does not support.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Handling {
    Strict,
    Lenient,
}

/// Parses a search over `resource_types` (empty with `_type` absent: every type, only
/// common parameters allowed).
pub fn parse_search(
    registry: &SearchParamRegistry,
    supported: &dyn SupportedParams,
    resource_types: Vec<String>,
    params: &[(String, String)],
    handling: Handling,
) -> Result<SearchRequest, SearchError> {
    if params.len() > MAX_PARAMETERS {
        return Err(SearchError::new(
            "_query",
            format!("a search takes at most {MAX_PARAMETERS} parameters"),
        ));
    }
    let mut request = SearchRequest::over(resource_types);
    let mut count_only = false;
    for (name, value) in params {
        let keep = match name.as_str() {
            "_count" => {
                request.count = match value.parse::<usize>() {
                    Ok(n) if (1..=MAX_COUNT).contains(&n) => n,
                    // search.html#count: no entries, only the total (as `_summary=count`).
                    Ok(0) => {
                        count_only = true;
                        DEFAULT_COUNT
                    }
                    _ => {
                        return Err(SearchError::new(
                            name,
                            format!("_count must be an integer from 1 to {MAX_COUNT}"),
                        ));
                    }
                };
                true
            }
            "_cursor" => {
                request.cursor = Some(value.clone());
                false
            }
            "_format" | "_pretty" => false,
            // Aidbox's name for how to count, which fhirpy's `count()` sends beside
            // `_count=0`; this server always counts exactly.
            "_totalMethod" => false,
            "_total" => {
                request.total = match value.as_str() {
                    "none" => TotalMode::None,
                    "accurate" | "estimate" => TotalMode::Accurate,
                    _ => {
                        return Err(SearchError::new(
                            name,
                            "_total must be none, estimate or accurate",
                        ));
                    }
                };
                true
            }
            "_summary" => {
                request.summary = match value.as_str() {
                    "count" => Summary::Count,
                    "false" => Summary::False,
                    _ => {
                        return Err(SearchError::new(
                            name,
                            "only _summary=count and _summary=false are supported",
                        ));
                    }
                };
                true
            }
            "_elements" => {
                for element in value.split(',').map(str::trim) {
                    if element.is_empty()
                        || !element
                            .chars()
                            .all(|c| c.is_ascii_alphanumeric() || c == '_')
                    {
                        return Err(SearchError::new(
                            name,
                            "_elements must be a comma-separated list of top-level element names",
                        ));
                    }
                    request.elements.push(element.to_owned());
                }
                true
            }
            "_sort" => {
                for key in value.split(',').map(str::trim) {
                    request.sort.push(parse_sort_key(
                        registry,
                        supported,
                        &request.resource_types,
                        key,
                    )?);
                }
                if request.sort.len() > MAX_SORT_KEYS {
                    return Err(SearchError::new(
                        name,
                        format!("at most {MAX_SORT_KEYS} sort keys are supported"),
                    ));
                }
                true
            }
            "_include" | "_revinclude" | "_include:iterate" | "_revinclude:iterate" => {
                if name.ends_with(":iterate") {
                    if handling == Handling::Lenient {
                        request.ignored.push(name.clone());
                        continue;
                    }
                    return Err(SearchError::new(name, ":iterate is not supported"));
                }
                let include = parse_include(registry, supported, name, value)?;
                if name == "_include" {
                    if !request.resource_types.contains(&include.source_type) {
                        return Err(SearchError::new(
                            name,
                            format!(
                                "_include must name a searched type, not '{}'",
                                include.source_type
                            ),
                        ));
                    }
                    request.includes.push(include);
                } else {
                    request.revincludes.push(include);
                }
                true
            }
            _ => match parse_criterion(registry, supported, &request.resource_types, name, value) {
                Ok(criterion) => {
                    request.criteria.push(criterion);
                    true
                }
                Err(Refusal::Unsupported(error)) if handling == Handling::Lenient => {
                    let _ = error;
                    request.ignored.push(name.clone());
                    false
                }
                Err(Refusal::Unsupported(error) | Refusal::Malformed(error)) => return Err(error),
            },
        };
        if keep {
            request.link_params.push((name.clone(), value.clone()));
        }
    }
    if count_only {
        request.summary = Summary::Count;
    }
    Ok(request)
}

/// Why a parameter was refused: lenient handling drops unsupported ones only.
enum Refusal {
    Unsupported(SearchError),
    Malformed(SearchError),
}

impl Refusal {
    /// The same refusal, naming the whole parameter as the client wrote it (for the inner
    /// part of a chain or `_has`).
    fn renamed(self, name: &str) -> Self {
        let rename = |mut error: SearchError| {
            error.parameter = name.chars().take(64).collect();
            error
        };
        match self {
            Self::Unsupported(error) => Self::Unsupported(rename(error)),
            Self::Malformed(error) => Self::Malformed(rename(error)),
        }
    }
}

fn unsupported(name: &str, message: impl Into<String>) -> Refusal {
    Refusal::Unsupported(SearchError::new(name, message))
}

fn malformed(name: &str, message: impl Into<String>) -> Refusal {
    Refusal::Malformed(SearchError::new(name, message))
}

/// The parameter's type on every searched type (it must mean the same everywhere).
fn param_type_on(
    supported: &dyn SupportedParams,
    resource_types: &[String],
    code: &str,
) -> Option<ParamType> {
    let mut found = None;
    for resource_type in resource_types {
        let param_type = supported.supported(resource_type, code)?;
        if found.is_some_and(|t| t != param_type) {
            return None;
        }
        found = Some(param_type);
    }
    found
}

fn parse_criterion(
    registry: &SearchParamRegistry,
    supported: &dyn SupportedParams,
    resource_types: &[String],
    name: &str,
    value: &str,
) -> Result<Criterion, Refusal> {
    if value.is_empty() {
        return Err(malformed(name, format!("parameter '{name}' has no value")));
    }
    if split_values(value).len() > MAX_VALUES {
        return Err(malformed(
            name,
            format!("parameter '{name}' has more than {MAX_VALUES} values"),
        ));
    }
    if let Some(rest) = name.strip_prefix("_has:") {
        return parse_has(registry, supported, resource_types, name, rest, value);
    }
    // `code[:modifier][.chained]`
    let (head, chained) = match name.split_once('.') {
        Some((head, chained)) => (head, Some(chained)),
        None => (name, None),
    };
    let (code, modifier) = match head.split_once(':') {
        Some((code, modifier)) => (code, Some(modifier)),
        None => (head, None),
    };
    if resource_types.is_empty() && !matches!(code, "_id" | "_lastUpdated") {
        return Err(unsupported(
            name,
            format!("'{code}' cannot be searched across all types; name the types with _type"),
        ));
    }
    match code {
        "_id" => {
            if modifier.is_some() || chained.is_some() {
                return Err(unsupported(name, "_id takes no modifier"));
            }
            return Ok(Criterion::Id(
                split_values(value)
                    .into_iter()
                    .map(|v| v.to_owned())
                    .collect(),
            ));
        }
        "_lastUpdated" => {
            if modifier.is_some() || chained.is_some() {
                return Err(unsupported(name, "_lastUpdated takes no modifier"));
            }
            let values = split_values(value)
                .into_iter()
                .map(|v| parse_date_value(name, &v))
                .collect::<Result<_, _>>()?;
            return Ok(Criterion::LastUpdated(values));
        }
        _ => {}
    }
    let Some(param_type) = param_type_on(supported, resource_types, code) else {
        let known = resource_types
            .iter()
            .all(|t| registry.get(t, code).is_some());
        return Err(unsupported(
            name,
            if known {
                format!("search parameter '{code}' is not supported by this server")
            } else {
                format!(
                    "unknown search parameter '{code}' for {}",
                    resource_types.join(", ")
                )
            },
        ));
    };

    if let Some(chained) = chained {
        if param_type != ParamType::Reference {
            return Err(malformed(
                name,
                format!("'{code}' is not a reference and cannot be chained"),
            ));
        }
        if chained.contains('.') {
            return Err(unsupported(name, "only one level of chaining is supported"));
        }
        let targets = reference_targets(registry, resource_types, code);
        let target_types = match modifier {
            Some(t)
                if targets
                    .iter()
                    .any(|target| target == t || target == "Resource") =>
            {
                vec![t.to_owned()]
            }
            Some(t) => {
                return Err(malformed(name, format!("'{code}' cannot refer to a {t}")));
            }
            // Without a type, every target type that has the chained parameter is searched
            // (search.html#chaining).
            None => {
                let chained_code = chained.split(':').next().unwrap_or(chained);
                let candidates: Vec<String> = targets
                    .into_iter()
                    .filter(|t| supported.supported(t, chained_code).is_some())
                    .collect();
                if candidates.is_empty() {
                    return Err(malformed(
                        name,
                        format!(
                            "no type '{code}' can refer to has a supported parameter '{chained_code}'"
                        ),
                    ));
                }
                candidates
            }
        };
        let inner = parse_criterion(registry, supported, &target_types, chained, value)
            .map_err(|refusal| refusal.renamed(name))?;
        if matches!(inner, Criterion::Chain { .. } | Criterion::Has { .. }) {
            return Err(unsupported(name, "only one level of chaining is supported"));
        }
        return Ok(Criterion::Chain {
            reference: code.to_owned(),
            target_types,
            inner: Box::new(inner),
        });
    }

    let modifier = parse_modifier(registry, resource_types, name, code, param_type, modifier)?;
    let (modifier, target_type) = modifier;
    let values = if modifier == Modifier::Missing {
        match value {
            "true" => vec![FilterValue::Missing(true)],
            "false" => vec![FilterValue::Missing(false)],
            _ => return Err(malformed(name, ":missing takes true or false")),
        }
    } else if param_type == ParamType::Composite {
        let components = components_on(supported, resource_types, code).ok_or_else(|| {
            unsupported(
                name,
                format!("'{code}' is not the same composite on every searched type"),
            )
        })?;
        split_unescaped(value, ',')
            .iter()
            .map(|tuple| parse_tuple(name, &components, tuple))
            .collect::<Result<_, _>>()?
    } else {
        split_unescaped(value, ',')
            .iter()
            .map(|v| parse_value(name, param_type, v))
            .collect::<Result<_, _>>()?
    };
    Ok(Criterion::Filter(Filter {
        code: code.to_owned(),
        param_type,
        modifier,
        target_type,
        values,
    }))
}

/// The composite's component types on every searched type (they must agree).
fn components_on(
    supported: &dyn SupportedParams,
    resource_types: &[String],
    code: &str,
) -> Option<Vec<ParamType>> {
    let mut found: Option<Vec<ParamType>> = None;
    for resource_type in resource_types {
        let components = supported.components(resource_type, code)?;
        if found.as_ref().is_some_and(|f| *f != components) {
            return None;
        }
        found = Some(components);
    }
    found
}

/// One alternative of a composite, `a$b` with `\$` for a literal `$`
/// (search.html#composite, #escaping): each component parsed as a value of its own type, so
/// a prefix can only lead a date, number or quantity component.
fn parse_tuple(name: &str, components: &[ParamType], tuple: &str) -> Result<FilterValue, Refusal> {
    let parts = split_unescaped(tuple, '$');
    if parts.len() != components.len() {
        return Err(malformed(
            name,
            format!(
                "'{name}' is a composite of {} components separated by '$' \
                 (write '\\$' for a '$' inside a value); this value has {} components",
                components.len(),
                parts.len()
            ),
        ));
    }
    parts
        .iter()
        .zip(components)
        .map(|(part, param_type)| parse_value(name, *param_type, part))
        .collect::<Result<_, _>>()
        .map(FilterValue::Composite)
}

fn parse_modifier(
    registry: &SearchParamRegistry,
    resource_types: &[String],
    name: &str,
    code: &str,
    param_type: ParamType,
    modifier: Option<&str>,
) -> Result<(Modifier, Option<String>), Refusal> {
    let Some(modifier) = modifier else {
        return Ok((Modifier::None, None));
    };
    let parsed = match (modifier, param_type) {
        ("missing", _) => Modifier::Missing,
        // search.html#composite: "Modifiers are not supported on composite parameters".
        (_, ParamType::Composite) => {
            return Err(malformed(
                name,
                format!("composite parameter '{code}' takes no modifier other than :missing"),
            ));
        }
        ("exact", ParamType::String) => Modifier::Exact,
        ("not", ParamType::Token) => Modifier::Not,
        ("contains", ParamType::String) => {
            return Err(unsupported(
                name,
                ":contains is not supported: string values are stored only as keyed digests of \
                 their prefixes, so a substring cannot be matched without plaintext",
            ));
        }
        ("text", ParamType::Token) => {
            return Err(unsupported(
                name,
                ":text is not supported: display text is not indexed (it would be stored in clear)",
            ));
        }
        (target, ParamType::Reference)
            if target
                .chars()
                .next()
                .is_some_and(|c| c.is_ascii_uppercase()) =>
        {
            if !reference_targets(registry, resource_types, code)
                .iter()
                .any(|t| t == target || t == "Resource")
            {
                return Err(malformed(
                    name,
                    format!("'{code}' cannot refer to a {target}"),
                ));
            }
            return Ok((Modifier::Type, Some(target.to_owned())));
        }
        _ => {
            return Err(unsupported(
                name,
                format!("modifier ':{modifier}' is not supported on '{code}'"),
            ));
        }
    };
    Ok((parsed, None))
}

fn parse_has(
    registry: &SearchParamRegistry,
    supported: &dyn SupportedParams,
    resource_types: &[String],
    name: &str,
    rest: &str,
    value: &str,
) -> Result<Criterion, Refusal> {
    // `_has:Observation:patient:code`
    let mut parts = rest.splitn(3, ':');
    let (Some(source_type), Some(reference), Some(param)) =
        (parts.next(), parts.next(), parts.next())
    else {
        return Err(malformed(
            name,
            "_has must read _has:Type:reference:parameter",
        ));
    };
    if param.starts_with("_has") {
        return Err(unsupported(name, "only one level of _has is supported"));
    }
    if supported.supported(source_type, reference) != Some(ParamType::Reference) {
        return Err(malformed(
            name,
            format!("'{reference}' is not a supported reference parameter of '{source_type}'"),
        ));
    }
    let targets = reference_targets(
        registry,
        std::slice::from_ref(&source_type.to_owned()),
        reference,
    );
    if !resource_types.iter().all(|t| {
        targets
            .iter()
            .any(|target| target == t || target == "Resource")
    }) {
        return Err(malformed(
            name,
            format!(
                "{source_type}.{reference} cannot refer to {}",
                resource_types.join(", ")
            ),
        ));
    }
    let inner = parse_criterion(
        registry,
        supported,
        std::slice::from_ref(&source_type.to_owned()),
        param,
        value,
    )
    .map_err(|refusal| refusal.renamed(name))?;
    if matches!(inner, Criterion::Chain { .. } | Criterion::Has { .. }) {
        return Err(unsupported(name, "only one level of _has is supported"));
    }
    Ok(Criterion::Has {
        source_type: source_type.to_owned(),
        reference: reference.to_owned(),
        inner: Box::new(inner),
    })
}

/// The types a reference parameter may point at, over every searched type.
fn reference_targets(
    registry: &SearchParamRegistry,
    resource_types: &[String],
    code: &str,
) -> Vec<String> {
    let mut targets: Vec<String> = resource_types
        .iter()
        .filter_map(|t| registry.get(t, code))
        .flat_map(|def| def.target.iter().cloned())
        .collect();
    targets.sort();
    targets.dedup();
    targets
}

fn parse_sort_key(
    registry: &SearchParamRegistry,
    supported: &dyn SupportedParams,
    resource_types: &[String],
    key: &str,
) -> Result<SortParam, SearchError> {
    let (code, descending) = match key.strip_prefix('-') {
        Some(code) => (code, true),
        None => (key, false),
    };
    if matches!(code, "_id" | "_lastUpdated") {
        return Ok(SortParam {
            code: code.to_owned(),
            param_type: None,
            descending,
        });
    }
    let Some(param_type) = param_type_on(supported, resource_types, code) else {
        let known = resource_types
            .iter()
            .all(|t| registry.get(t, code).is_some());
        return Err(SearchError::new(
            "_sort",
            if known && !resource_types.is_empty() {
                format!("cannot sort by '{code}': the parameter is not supported by this server")
            } else {
                format!("cannot sort by unknown parameter '{code}'")
            },
        ));
    };
    if param_type == ParamType::Composite {
        return Err(SearchError::new(
            "_sort",
            format!("cannot sort by '{code}': a composite has no order"),
        ));
    }
    Ok(SortParam {
        code: code.to_owned(),
        param_type: Some(param_type),
        descending,
    })
}

fn parse_include(
    registry: &SearchParamRegistry,
    supported: &dyn SupportedParams,
    name: &str,
    value: &str,
) -> Result<Include, SearchError> {
    if value == "*" || value.ends_with(":*") {
        return Err(SearchError::new(
            name,
            format!("{name}=* is not supported; name the parameter"),
        ));
    }
    let mut parts = value.split(':');
    let (Some(source_type), Some(param)) = (parts.next(), parts.next()) else {
        return Err(SearchError::new(
            name,
            format!("{name} must read Type:parameter[:TargetType]"),
        ));
    };
    let target_type = parts.next().map(str::to_owned);
    if parts.next().is_some() {
        return Err(SearchError::new(
            name,
            format!("{name} must read Type:parameter[:TargetType]"),
        ));
    }
    if supported.supported(source_type, param) != Some(ParamType::Reference) {
        return Err(SearchError::new(
            name,
            format!("'{param}' is not a supported reference parameter of '{source_type}'"),
        ));
    }
    if let Some(target) = &target_type {
        let targets = reference_targets(
            registry,
            std::slice::from_ref(&source_type.to_owned()),
            param,
        );
        if !targets.iter().any(|t| t == target || t == "Resource") {
            return Err(SearchError::new(
                name,
                format!("{source_type}.{param} cannot refer to a {target}"),
            ));
        }
    }
    Ok(Include {
        source_type: source_type.to_owned(),
        param: param.to_owned(),
        target_type,
    })
}

/// Splits alternatives at unescaped commas and removes `\` escapes (search.html#escaping).
pub fn split_values(value: &str) -> Vec<String> {
    split_unescaped(value, ',')
        .iter()
        .map(|part| unescape(part))
        .collect()
}

/// Splits at every `separator` not escaped by `\`, keeping the escapes for a later split
/// (a composite's `$` inside its `,` alternatives) or [`unescape`].
fn split_unescaped(value: &str, separator: char) -> Vec<String> {
    let mut parts = vec![String::new()];
    let mut chars = value.chars();
    while let Some(c) = chars.next() {
        if c == separator {
            parts.push(String::new());
            continue;
        }
        let Some(last) = parts.last_mut() else {
            continue;
        };
        last.push(c);
        if c == '\\' {
            last.extend(chars.next());
        }
    }
    parts
}

/// Removes the `\` before `,` `$` `|` and `\`; any other backslash stays as written.
fn unescape(value: &str) -> String {
    let mut out = String::with_capacity(value.len());
    let mut chars = value.chars();
    while let Some(c) = chars.next() {
        if c != '\\' {
            out.push(c);
            continue;
        }
        match chars.next() {
            Some(next @ (',' | '$' | '|' | '\\')) => out.push(next),
            Some(other) => {
                out.push('\\');
                out.push(other);
            }
            None => out.push('\\'),
        }
    }
    out
}

/// Splits still-escaped text at its first `n - 1` unescaped `|` and removes the escapes from
/// each part: `http://x|a\|b` is system `http://x`, code `a|b` (search.html#escaping).
fn split_bars(value: &str, n: usize) -> Vec<String> {
    let mut parts = split_unescaped(value, '|');
    if parts.len() > n {
        let rest = parts.split_off(n - 1).join("|");
        parts.push(rest);
    }
    parts.iter().map(|part| unescape(part)).collect()
}

/// Parses one alternative of a parameter's value, still escaped: the separators inside a
/// token or quantity are found before the escapes are removed.
fn parse_value(name: &str, param_type: ParamType, escaped: &str) -> Result<FilterValue, Refusal> {
    let value = unescape(escaped);
    if value.is_empty() {
        return Err(malformed(
            name,
            format!("parameter '{name}' has an empty value"),
        ));
    }
    Ok(match param_type {
        ParamType::String => FilterValue::String(value),
        ParamType::Token => match split_bars(escaped, 2).as_slice() {
            [system, code] => FilterValue::Token {
                system: Some(system.clone()),
                code: (!code.is_empty()).then(|| code.clone()),
            },
            _ => FilterValue::Token {
                system: None,
                code: Some(value),
            },
        },
        ParamType::Reference => FilterValue::Reference(value),
        ParamType::Uri => FilterValue::Uri(value),
        ParamType::Date => parse_date_value(name, &value)?,
        ParamType::Number => {
            let (prefix, text) = split_prefix(name, &value)?;
            let (low, high) = number_range(text).ok_or_else(|| {
                malformed(
                    name,
                    format!("'{name}' needs a number, such as 5.4 or ge10"),
                )
            })?;
            let value = text
                .parse::<f64>()
                .map_err(|_| malformed(name, "not a number"))?;
            FilterValue::Number {
                prefix,
                value,
                low,
                high,
            }
        }
        ParamType::Quantity => {
            // `[prefix]number|system|code` or `[prefix]number||code` or `[prefix]number`
            let parts = split_bars(escaped, 3);
            let mut parts = parts.iter().map(String::as_str);
            let number = parts.next().unwrap_or_default();
            let system = parts.next();
            let code = parts.next();
            if system.is_some() && code.is_none() {
                return Err(malformed(
                    name,
                    format!("'{name}' must read number, number|system|code or number||code"),
                ));
            }
            let (prefix, text) = split_prefix(name, number)?;
            let (low, high) = number_range(text).ok_or_else(|| {
                malformed(
                    name,
                    format!("'{name}' needs a number, such as 5.4|http://unitsofmeasure.org|mg"),
                )
            })?;
            let value = text
                .parse::<f64>()
                .map_err(|_| malformed(name, "not a number"))?;
            FilterValue::Quantity {
                prefix,
                value,
                low,
                high,
                system: system.filter(|s| !s.is_empty()).map(str::to_owned),
                code: code.filter(|c| !c.is_empty()).map(str::to_owned),
            }
        }
        // A composite's components are values of other types; a component cannot be one.
        ParamType::Composite | ParamType::Special => {
            return Err(unsupported(
                name,
                format!("'{name}' is not supported by this server"),
            ));
        }
    })
}

fn parse_date_value(name: &str, value: &str) -> Result<FilterValue, Refusal> {
    let (prefix, text) = split_prefix(name, value)?;
    let (low, high) = date_range(text).ok_or_else(|| {
        malformed(
            name,
            format!("'{name}' needs a date such as 2024, 2024-03-01 or ge2024-03-01T10:00:00Z"),
        )
    })?;
    Ok(FilterValue::Date { prefix, low, high })
}

/// Splits a two-letter comparison prefix off a date/number/quantity value.
fn split_prefix<'v>(name: &str, value: &'v str) -> Result<(Prefix, &'v str), Refusal> {
    let starts_alpha = value
        .chars()
        .next()
        .is_some_and(|c| c.is_ascii_alphabetic());
    if !starts_alpha {
        return Ok((Prefix::Eq, value));
    }
    // Two bytes, when they end on a character boundary (a value of `R` and a 4-byte
    // character must not be cut inside it).
    let (head, rest) = value
        .split_at_checked(value.len().min(2))
        .unwrap_or((value, ""));
    let prefix = match head {
        "eq" => Prefix::Eq,
        "ne" => Prefix::Ne,
        "gt" => Prefix::Gt,
        "lt" => Prefix::Lt,
        "ge" => Prefix::Ge,
        "le" => Prefix::Le,
        "sa" => Prefix::Sa,
        "eb" => Prefix::Eb,
        "ap" => Prefix::Ap,
        _ => {
            return Err(malformed(
                name,
                format!(
                    "unknown prefix '{}' on '{name}'; use eq, ne, gt, lt, ge, le, sa, eb or ap",
                    head.chars().take(2).collect::<String>()
                ),
            ));
        }
    };
    Ok((prefix, rest))
}

/// Whether `name` is a result parameter (not a filter).
pub fn is_result_param(name: &str) -> bool {
    RESULT_PARAMS.contains(&name) || name.starts_with("_include") || name.starts_with("_revinclude")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn escapes_survive_until_the_split_they_belong_to() {
        assert_eq!(split_values(r"a\,b,c\$d\|e\\f\x"), [r"a,b", r"c$d|e\f\x"]);
        assert_eq!(split_values(r"end\"), [r"end\"]);
        // A composite splits at `,` then `$`, and only then removes the escapes.
        let alternatives = split_unescaped(r"urn:x|a\$b$z\,y,c$d", ',');
        assert_eq!(alternatives, [r"urn:x|a\$b$z\,y", "c$d"]);
        let parts = split_unescaped(&alternatives[0], '$');
        assert_eq!(parts, [r"urn:x|a\$b", r"z\,y"]);
        assert_eq!(unescape(&parts[0]), "urn:x|a$b");
        assert_eq!(unescape(&parts[1]), "z,y");
    }

    #[test]
    fn an_escaped_bar_belongs_to_the_code_not_the_separator() {
        let token = |text: &str| match parse_value("code", ParamType::Token, text) {
            Ok(FilterValue::Token { system, code }) => (system, code),
            other => panic!("{text}: {:?}", other.err().map(|_| ())),
        };
        assert_eq!(token(r"a\|b"), (None, Some("a|b".to_owned())));
        assert_eq!(
            token(r"http://x\|y|a\|b|c"),
            (Some("http://x|y".to_owned()), Some("a|b|c".to_owned()))
        );
        assert_eq!(
            token(r"|a\,b"),
            (Some(String::new()), Some("a,b".to_owned()))
        );
        assert_eq!(token(r"urn:s|"), (Some("urn:s".to_owned()), None));
        let quantity = parse_value("value-quantity", ParamType::Quantity, r"5|urn:u\|v|m\|g");
        let Ok(FilterValue::Quantity { system, code, .. }) = quantity else {
            panic!("quantity did not parse");
        };
        assert_eq!(system.as_deref(), Some("urn:u|v"));
        assert_eq!(code.as_deref(), Some("m|g"));
    }

    #[test]
    fn composite_tuples_parse_each_component_as_its_type() {
        let tuple = parse_tuple(
            "code-value-quantity",
            &[ParamType::Token, ParamType::Quantity],
            "http://loinc.org|8480-6$gt100|http://unitsofmeasure.org|mm[Hg]",
        );
        let Ok(FilterValue::Composite(parts)) = tuple else {
            panic!("{:?}", tuple.err().map(|_| ()));
        };
        assert_eq!(
            parts[0],
            FilterValue::Token {
                system: Some("http://loinc.org".to_owned()),
                code: Some("8480-6".to_owned())
            }
        );
        assert!(matches!(
            &parts[1],
            FilterValue::Quantity { prefix: Prefix::Gt, value, code: Some(code), .. }
                if *value == 100.0 && code == "mm[Hg]"
        ));
        // A prefix on a token component is just part of the code.
        let Ok(FilterValue::Composite(parts)) =
            parse_tuple("p", &[ParamType::Token, ParamType::Token], "gt5$x")
        else {
            panic!("token tuple");
        };
        assert_eq!(
            parts[0],
            FilterValue::Token {
                system: None,
                code: Some("gt5".to_owned())
            }
        );
        for bad in ["a", "a$b$c", "a$", "a$yesterday"] {
            assert!(
                matches!(
                    parse_tuple("p", &[ParamType::Token, ParamType::Date], bad),
                    Err(Refusal::Malformed(_))
                ),
                "{bad}"
            );
        }
    }
}
