//! A compiler and evaluator for the subset of FHIRPath (http://hl7.org/fhirpath/N1/) that the
//! R4 SearchParameter definitions use, over resources in their R4 JSON form.
//!
//! Expressions are compiled once into a small tree and evaluated without re-parsing; evaluation
//! borrows from the resource and from the compiled expression, never clones JSON subtrees, and
//! never fails: odd shapes simply produce fewer nodes. Anything outside the subset is refused at
//! compile time with [`UnsupportedExpression`].
//!
//! Supported: paths (`Patient.name.family`; a leading capitalised name is a type filter on the
//! resource), `|`, parentheses, indexers (`entry[0]`), choice elements (`Observation.value` finds
//! `valueQuantity` and remembers `Quantity` as a type hint), `is`/`as` and the functions `as()`,
//! `is()`, `ofType()`, `where()`, `exists()`, `empty()`, `not()`, `first()`, `resolve() is T`
//! inside `where()`, `=`/`!=` against literals and paths, `and`, `$this` and `%resource`.

use std::fmt;

use serde_json::Value;

/// Longest expression compiled (R4's longest search parameter expression is under 2 KiB).
const MAX_SOURCE_BYTES: usize = 8 * 1024;
/// Deepest expression tree compiled: parentheses and function arguments, and chains of
/// steps or `and`s, each a level.
const MAX_DEPTH: usize = 64;

/// Whether the tree under `expr` is deeper than `limit` levels (looking no further).
fn deeper_than(expr: &Expr, limit: usize) -> bool {
    let Some(limit) = limit.checked_sub(1) else {
        return true;
    };
    if let Some(inner) = expr.single_operand() {
        return deeper_than(inner, limit);
    }
    match expr {
        Expr::Union(items) => items.iter().any(|item| deeper_than(item, limit)),
        Expr::Where(left, right) | Expr::And(left, right) | Expr::Equals { left, right, .. } => {
            deeper_than(left, limit) || deeper_than(right, limit)
        }
        Expr::Resolve(inner) => deeper_than(inner, limit),
        _ => false,
    }
}

/// `true` and `false` as JSON, so computed booleans can be nodes like any other.
static TRUE: Value = Value::Bool(true);
static FALSE: Value = Value::Bool(false);

/// An expression outside the supported subset, or a malformed one.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unsupported FHIRPath expression {expression:?} at offset {offset}: {reason}")]
pub struct UnsupportedExpression {
    pub expression: String,
    /// Byte offset into `expression` where compilation gave up.
    pub offset: usize,
    pub reason: String,
}

/// One item of an evaluation result: a JSON value inside the resource (or a literal of the
/// expression), with the FHIR type name when a choice element (`valueQuantity`) revealed it.
#[derive(Debug, Clone, Copy)]
pub struct Node<'a> {
    pub value: &'a Value,
    /// FHIR type name (`Quantity`, `dateTime`, `Period`, …) from a choice element's suffix.
    pub type_hint: Option<&'static str>,
}

impl<'a> Node<'a> {
    fn plain(value: &'a Value) -> Self {
        Self {
            value,
            type_hint: None,
        }
    }

    fn boolean(value: bool) -> Self {
        Self {
            value: if value { &TRUE } else { &FALSE },
            type_hint: Some("boolean"),
        }
    }

    fn same(&self, other: &Node<'_>) -> bool {
        std::ptr::eq(self.value, other.value) && self.type_hint == other.type_hint
    }
}

/// A compiled FHIRPath expression.
#[derive(Debug, Clone)]
pub struct Expression {
    source: String,
    root: Expr,
}

#[derive(Debug, Clone)]
enum Expr {
    /// `$this`: the focus (the resource at top level, the item inside `where()`).
    This,
    /// `%resource`: the resource being evaluated, wherever we are.
    Resource,
    /// A leading type name (`Patient`): the resource if it is of that type, else nothing.
    TypeRoot(String),
    Literal(Value),
    Member(Box<Expr>, String),
    Index(Box<Expr>, usize),
    Union(Vec<Expr>),
    /// `as` / `ofType`: keep the nodes of a type.
    OfType(Box<Expr>, TypeName),
    /// `is`: whether the single node is of a type.
    Is(Box<Expr>, TypeName),
    /// `resolve() is T`: whether the single reference points at a resource of type T.
    ResolvesTo(Box<Expr>, String),
    Where(Box<Expr>, Box<Expr>),
    Exists(Box<Expr>),
    Empty(Box<Expr>),
    Not(Box<Expr>),
    First(Box<Expr>),
    Equals {
        left: Box<Expr>,
        right: Box<Expr>,
        negate: bool,
    },
    And(Box<Expr>, Box<Expr>),
    /// `resolve()` only compiles as the left side of `is`; kept until then.
    Resolve(Box<Expr>),
}

/// A type specifier, normalised to FHIR's spelling (`DateTime` → `dateTime`).
#[derive(Debug, Clone)]
struct TypeName(String);

impl Expression {
    /// Compiles `source`, refusing anything outside the supported subset.
    pub fn compile(source: &str) -> Result<Self, UnsupportedExpression> {
        // Clients send expressions too (FHIRPath Patch paths): every walk of the tree is
        // recursive, so its size and depth are bounded before any walk.
        let refuse = |reason: &str| UnsupportedExpression {
            expression: source.chars().take(64).collect(),
            offset: 0,
            reason: reason.to_owned(),
        };
        if source.len() > MAX_SOURCE_BYTES {
            return Err(refuse("the expression is too long"));
        }
        let tokens = lex(source)?;
        let mut parser = Parser {
            source,
            tokens,
            position: 0,
            function_depth: 0,
            nesting: 0,
        };
        let root = parser.expression()?;
        if let Some(token) = parser.tokens.get(parser.position) {
            return Err(parser.error_at(token.offset, "unexpected trailing input"));
        }
        if deeper_than(&root, MAX_DEPTH) {
            return Err(refuse("the expression nests too deeply"));
        }
        check_no_bare_resolve(&root).map_err(|reason| UnsupportedExpression {
            expression: source.to_owned(),
            offset: 0,
            reason: reason.to_owned(),
        })?;
        Ok(Self {
            source: source.to_owned(),
            root,
        })
    }

    /// The expression as written.
    pub fn source(&self) -> &str {
        &self.source
    }

    /// Evaluates against `resource`, whose type is `resource_type`.
    pub fn evaluate<'a>(&'a self, resource_type: &str, resource: &'a Value) -> Vec<Node<'a>> {
        let context = Context {
            resource_type,
            resource,
        };
        eval(&self.root, &context, Node::plain(resource))
    }

    /// Evaluates relative to `focus` (as a composite component is), within `resource`.
    pub fn evaluate_on<'a>(
        &'a self,
        resource_type: &str,
        resource: &'a Value,
        focus: Node<'a>,
    ) -> Vec<Node<'a>> {
        let context = Context {
            resource_type,
            resource,
        };
        eval(&self.root, &context, focus)
    }
}

impl Expression {
    /// The top-level elements of a `resource_type` resource that evaluating this expression
    /// can read (`Observation.subject.where(…)` reads `subject`; a choice name such as
    /// `value` stands for `valueQuantity` and its siblings), or `None` when it may read the
    /// whole resource (`%resource`, a bare type name). Lets a caller parse only those
    /// elements of a stored resource.
    pub fn top_level_elements(&self, resource_type: &str) -> Option<Vec<String>> {
        let mut names = Vec::new();
        collect_top_level(&self.root, resource_type, true, &mut names).then_some(names)
    }
}

/// Whether `expr` evaluated on the resource (`at_root`: `$this` is the resource) reads only
/// named top-level elements; pushes their names. An expression that yields the resource
/// itself other than to take a member of it reads everything.
fn collect_top_level(
    expr: &Expr,
    resource_type: &str,
    at_root: bool,
    names: &mut Vec<String>,
) -> bool {
    let is_root = |inner: &Expr| match inner {
        Expr::TypeRoot(name) => {
            name == resource_type || name == "Resource" || name == "DomainResource"
        }
        Expr::This => at_root,
        _ => false,
    };
    if let Expr::Member(inner, name) = expr
        && is_root(inner)
    {
        names.push(name.clone());
        return true;
    }
    if let Some(inner) = expr.single_operand() {
        return collect_top_level(inner, resource_type, at_root, names);
    }
    match expr {
        // Another type's root yields nothing here; a literal reads nothing.
        Expr::TypeRoot(_) | Expr::Literal(_) => !is_root(expr),
        Expr::This => !at_root,
        Expr::Resource | Expr::Resolve(_) => false,
        Expr::Member(..)
        | Expr::Index(..)
        | Expr::OfType(..)
        | Expr::Is(..)
        | Expr::ResolvesTo(..)
        | Expr::Exists(_)
        | Expr::Empty(_)
        | Expr::Not(_)
        | Expr::First(_) => true,
        Expr::Union(items) => items
            .iter()
            .all(|item| collect_top_level(item, resource_type, at_root, names)),
        // Inside `where()`, `$this` is each item, not the resource.
        Expr::Where(left, right) => {
            collect_top_level(left, resource_type, at_root, names)
                && collect_top_level(right, resource_type, false, names)
        }
        Expr::And(left, right) | Expr::Equals { left, right, .. } => {
            collect_top_level(left, resource_type, at_root, names)
                && collect_top_level(right, resource_type, at_root, names)
        }
    }
}

impl Expression {
    /// `parent.name` split at its last step when that step is a plain member access (what
    /// FHIRPath Patch's `insert` and `move` name a list by): the parent expression and the
    /// member name.
    pub fn split_last_member(&self) -> Option<(Expression, String)> {
        match &self.root {
            Expr::Member(parent, name) => Some((
                Expression {
                    source: self.source.clone(),
                    root: (**parent).clone(),
                },
                name.clone(),
            )),
            _ => None,
        }
    }
}

impl Expr {
    /// The one operand of a step that has one (a member access, an indexer, a type test,
    /// a function of its input).
    fn single_operand(&self) -> Option<&Expr> {
        match self {
            Expr::Member(inner, _)
            | Expr::Index(inner, _)
            | Expr::OfType(inner, _)
            | Expr::Is(inner, _)
            | Expr::ResolvesTo(inner, _)
            | Expr::Exists(inner)
            | Expr::Empty(inner)
            | Expr::Not(inner)
            | Expr::First(inner) => Some(inner),
            _ => None,
        }
    }
}

fn check_no_bare_resolve(expr: &Expr) -> Result<(), &'static str> {
    if let Some(inner) = expr.single_operand() {
        return check_no_bare_resolve(inner);
    }
    match expr {
        Expr::Resolve(_) => Err("resolve() is only supported as `resolve() is Type`"),
        Expr::This
        | Expr::Resource
        | Expr::TypeRoot(_)
        | Expr::Literal(_)
        | Expr::Member(..)
        | Expr::Index(..)
        | Expr::OfType(..)
        | Expr::Is(..)
        | Expr::ResolvesTo(..)
        | Expr::Exists(_)
        | Expr::Empty(_)
        | Expr::Not(_)
        | Expr::First(_) => Ok(()),
        Expr::Union(items) => items.iter().try_for_each(check_no_bare_resolve),
        Expr::Where(left, right) | Expr::And(left, right) | Expr::Equals { left, right, .. } => {
            check_no_bare_resolve(left)?;
            check_no_bare_resolve(right)
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Lexer

#[derive(Debug, Clone, PartialEq)]
enum Tok {
    Ident(String),
    /// `$this`, `%resource`: the sigil stays in the name.
    Special(String),
    Str(String),
    Number(f64, usize),
    Dot,
    Comma,
    LParen,
    RParen,
    LBracket,
    RBracket,
    Pipe,
    Equal,
    NotEqual,
    /// An operator outside the subset, kept to report it by name.
    Other(String),
}

#[derive(Debug, Clone)]
struct Token {
    tok: Tok,
    offset: usize,
}

fn lex(source: &str) -> Result<Vec<Token>, UnsupportedExpression> {
    let error = |offset: usize, reason: &str| UnsupportedExpression {
        expression: source.to_owned(),
        offset,
        reason: reason.to_owned(),
    };
    let bytes = source.as_bytes();
    let mut tokens = Vec::new();
    let mut i = 0;
    while let Some(&byte) = bytes.get(i) {
        let start = i;
        let tok = match byte {
            b' ' | b'\t' | b'\r' | b'\n' => {
                i += 1;
                continue;
            }
            b'.' => Tok::Dot,
            b',' => Tok::Comma,
            b'(' => Tok::LParen,
            b')' => Tok::RParen,
            b'[' => Tok::LBracket,
            b']' => Tok::RBracket,
            b'|' => Tok::Pipe,
            b'=' => Tok::Equal,
            b'!' if bytes.get(i + 1) == Some(&b'=') => {
                i += 1;
                Tok::NotEqual
            }
            b'\'' => {
                let (text, end) = lex_string(source, i)
                    .ok_or_else(|| error(start, "unterminated or malformed string literal"))?;
                i = end;
                tokens.push(Token {
                    tok: Tok::Str(text),
                    offset: start,
                });
                continue;
            }
            b'`' => {
                let end = source
                    .get(i + 1..)
                    .and_then(|rest| rest.find('`'))
                    .ok_or_else(|| error(start, "unterminated delimited identifier"))?;
                let name = source.get(i + 1..i + 1 + end).unwrap_or_default();
                i += end + 2;
                tokens.push(Token {
                    tok: Tok::Ident(name.to_owned()),
                    offset: start,
                });
                continue;
            }
            b'0'..=b'9' => {
                let mut end = i;
                while bytes.get(end).is_some_and(u8::is_ascii_digit) {
                    end += 1;
                }
                if bytes.get(end) == Some(&b'.')
                    && bytes.get(end + 1).is_some_and(u8::is_ascii_digit)
                {
                    end += 1;
                    while bytes.get(end).is_some_and(u8::is_ascii_digit) {
                        end += 1;
                    }
                }
                let text = source.get(i..end).unwrap_or_default();
                let value = text
                    .parse::<f64>()
                    .map_err(|_| error(start, "malformed number"))?;
                let integer = text.parse::<usize>().unwrap_or(usize::MAX);
                i = end;
                tokens.push(Token {
                    tok: Tok::Number(value, integer),
                    offset: start,
                });
                continue;
            }
            b'$' | b'%' | b'_' | b'a'..=b'z' | b'A'..=b'Z' => {
                let mut end = i + 1;
                while bytes
                    .get(end)
                    .is_some_and(|b| b.is_ascii_alphanumeric() || *b == b'_')
                {
                    end += 1;
                }
                let text = source.get(i..end).unwrap_or_default().to_owned();
                i = end;
                let tok = if byte == b'$' || byte == b'%' {
                    Tok::Special(text)
                } else {
                    Tok::Ident(text)
                };
                tokens.push(Token { tok, offset: start });
                continue;
            }
            _ => {
                let len = source
                    .get(i..)
                    .and_then(|rest| rest.chars().next())
                    .map_or(1, char::len_utf8);
                let mut text = source.get(i..i + len).unwrap_or_default().to_owned();
                // Two-character operators, so the error names them whole.
                if let Some(next) = bytes.get(i + len).filter(|b| b"=~".contains(b)) {
                    text.push(char::from(*next));
                    i += 1;
                }
                i += len - 1;
                Tok::Other(text)
            }
        };
        i += 1;
        tokens.push(Token { tok, offset: start });
    }
    Ok(tokens)
}

/// A `'…'` literal with FHIRPath escapes; returns the text and the offset after the quote.
fn lex_string(source: &str, start: usize) -> Option<(String, usize)> {
    let mut text = String::new();
    let mut chars = source.get(start + 1..)?.char_indices();
    while let Some((offset, c)) = chars.next() {
        match c {
            '\'' => return Some((text, start + 1 + offset + 1)),
            '\\' => {
                let (_, escaped) = chars.next()?;
                text.push(match escaped {
                    'n' => '\n',
                    'r' => '\r',
                    't' => '\t',
                    'f' => '\u{c}',
                    '\'' | '"' | '`' | '\\' | '/' => escaped,
                    _ => return None,
                });
            }
            _ => text.push(c),
        }
    }
    None
}

// ---------------------------------------------------------------------------------------------
// Parser: precedence from http://hl7.org/fhirpath/N1/#operator-precedence, restricted to the
// supported operators: `.`/`[]` > `is`/`as` > `|` > `=`/`!=` > `and`.

struct Parser<'s> {
    source: &'s str,
    tokens: Vec<Token>,
    position: usize,
    /// Inside a function's argument, a leading name is a member of the focus, not a type.
    function_depth: usize,
    /// Parentheses and function arguments open around the current token: parsing
    /// recurses once per level, so it is bounded while parsing.
    nesting: usize,
}

impl Parser<'_> {
    /// One more level of parentheses or function arguments, within [`MAX_DEPTH`].
    fn enter(&mut self) -> Result<(), UnsupportedExpression> {
        if self.nesting >= MAX_DEPTH {
            return Err(self.error_here("the expression nests too deeply"));
        }
        self.nesting += 1;
        Ok(())
    }

    fn error_at(&self, offset: usize, reason: impl Into<String>) -> UnsupportedExpression {
        UnsupportedExpression {
            expression: self.source.to_owned(),
            offset,
            reason: reason.into(),
        }
    }

    fn error_here(&self, reason: impl Into<String>) -> UnsupportedExpression {
        let offset = self
            .tokens
            .get(self.position)
            .map_or(self.source.len(), |token| token.offset);
        self.error_at(offset, reason)
    }

    fn peek(&self) -> Option<&Tok> {
        self.tokens.get(self.position).map(|token| &token.tok)
    }

    fn peek_keyword(&self, keyword: &str) -> bool {
        matches!(self.peek(), Some(Tok::Ident(name)) if name == keyword)
    }

    fn next(&mut self) -> Option<Tok> {
        let tok = self
            .tokens
            .get(self.position)
            .map(|token| token.tok.clone());
        self.position += 1;
        tok
    }

    fn expect(&mut self, expected: &Tok, what: &str) -> Result<(), UnsupportedExpression> {
        if self.peek() == Some(expected) {
            self.position += 1;
            Ok(())
        } else {
            Err(self.error_here(format!("expected {what}")))
        }
    }

    fn expression(&mut self) -> Result<Expr, UnsupportedExpression> {
        let mut left = self.equality()?;
        loop {
            if self.peek_keyword("and") {
                self.position += 1;
                let right = self.equality()?;
                left = Expr::And(Box::new(left), Box::new(right));
            } else if let Some(Tok::Ident(name)) = self.peek()
                && ["or", "xor", "implies", "in", "contains"].contains(&name.as_str())
            {
                return Err(self.error_here(format!("operator `{name}` is not supported")));
            } else {
                return Ok(left);
            }
        }
    }

    fn equality(&mut self) -> Result<Expr, UnsupportedExpression> {
        let left = self.union()?;
        let negate = match self.peek() {
            Some(Tok::Equal) => false,
            Some(Tok::NotEqual) => true,
            _ => return Ok(left),
        };
        self.position += 1;
        let right = self.union()?;
        Ok(Expr::Equals {
            left: Box::new(left),
            right: Box::new(right),
            negate,
        })
    }

    fn union(&mut self) -> Result<Expr, UnsupportedExpression> {
        let mut items = vec![self.type_expression()?];
        while self.peek() == Some(&Tok::Pipe) {
            self.position += 1;
            items.push(self.type_expression()?);
        }
        Ok(if items.len() == 1 {
            items.pop().unwrap_or(Expr::Union(Vec::new()))
        } else {
            Expr::Union(items)
        })
    }

    fn type_expression(&mut self) -> Result<Expr, UnsupportedExpression> {
        let mut left = self.postfix()?;
        while self.peek_keyword("is") || self.peek_keyword("as") {
            let is = self.peek_keyword("is");
            self.position += 1;
            let type_name = self.type_specifier()?;
            left = type_operation(left, type_name, is);
        }
        Ok(left)
    }

    fn type_specifier(&mut self) -> Result<TypeName, UnsupportedExpression> {
        let Some(Tok::Ident(mut name)) = self.next() else {
            self.position -= 1;
            return Err(self.error_here("expected a type name"));
        };
        // `FHIR.Quantity`, `System.String`: the namespace does not change what we can check.
        if (name == "FHIR" || name == "System") && self.peek() == Some(&Tok::Dot) {
            self.position += 1;
            let Some(Tok::Ident(qualified)) = self.next() else {
                self.position -= 1;
                return Err(self.error_here("expected a type name"));
            };
            name = qualified;
        }
        Ok(TypeName::new(name))
    }

    fn postfix(&mut self) -> Result<Expr, UnsupportedExpression> {
        let mut expr = self.term()?;
        loop {
            match self.peek() {
                Some(Tok::Dot) => {
                    self.position += 1;
                    let Some(Tok::Ident(name)) = self.next() else {
                        self.position -= 1;
                        return Err(self.error_here("expected a name after `.`"));
                    };
                    expr = if self.peek() == Some(&Tok::LParen) {
                        self.function(expr, &name)?
                    } else {
                        Expr::Member(Box::new(expr), name)
                    };
                }
                Some(Tok::LBracket) => {
                    self.position += 1;
                    let Some(Tok::Number(_, index)) = self.next() else {
                        self.position -= 1;
                        return Err(self.error_here("only integer literal indexers are supported"));
                    };
                    if index == usize::MAX {
                        self.position -= 1;
                        return Err(self.error_here("only integer literal indexers are supported"));
                    }
                    self.expect(&Tok::RBracket, "`]`")?;
                    expr = Expr::Index(Box::new(expr), index);
                }
                _ => return Ok(expr),
            }
        }
    }

    fn term(&mut self) -> Result<Expr, UnsupportedExpression> {
        match self.next() {
            Some(Tok::LParen) => {
                self.enter()?;
                let inner = self.expression();
                self.nesting -= 1;
                let inner = inner?;
                self.expect(&Tok::RParen, "`)`")?;
                Ok(inner)
            }
            Some(Tok::Str(text)) => Ok(Expr::Literal(Value::String(text))),
            Some(Tok::Number(value, _)) => serde_json::Number::from_f64(value)
                .map(|number| Expr::Literal(Value::Number(number)))
                .ok_or_else(|| self.error_here("malformed number")),
            Some(Tok::Special(name)) => match name.as_str() {
                "$this" => Ok(Expr::This),
                "%resource" | "%rootResource" => Ok(Expr::Resource),
                _ => {
                    self.position -= 1;
                    Err(self.error_here(format!("`{name}` is not supported")))
                }
            },
            Some(Tok::Ident(name)) => match name.as_str() {
                "true" => Ok(Expr::Literal(Value::Bool(true))),
                "false" => Ok(Expr::Literal(Value::Bool(false))),
                _ if self.peek() == Some(&Tok::LParen) => self.function(Expr::This, &name),
                // At top level a leading capitalised name is the resource type
                // (fhirpath §4.1 "Paths and polymorphic items"); inside a function argument
                // it is a member of the item in focus.
                _ if self.function_depth == 0 && name.starts_with(|c: char| c.is_uppercase()) => {
                    Ok(Expr::TypeRoot(name))
                }
                _ => Ok(Expr::Member(Box::new(Expr::This), name)),
            },
            Some(Tok::Other(operator)) => {
                self.position -= 1;
                Err(self.error_here(format!("operator `{operator}` is not supported")))
            }
            Some(_) => {
                self.position -= 1;
                Err(self.error_here("unexpected token"))
            }
            None => Err(self.error_here("unexpected end of expression")),
        }
    }

    /// A function call on `focus`; the current token is the `(`.
    fn function(&mut self, focus: Expr, name: &str) -> Result<Expr, UnsupportedExpression> {
        let name_offset = self
            .tokens
            .get(self.position.saturating_sub(1))
            .map_or(0, |token| token.offset);
        self.expect(&Tok::LParen, "`(`")?;
        let focus = Box::new(focus);
        let expr = match name {
            "as" | "is" | "ofType" => {
                let type_name = self.type_specifier()?;
                match name {
                    "is" => type_operation(*focus, type_name, true),
                    _ => Expr::OfType(focus, type_name),
                }
            }
            "where" => {
                self.enter()?;
                self.function_depth += 1;
                let criteria = self.expression();
                self.function_depth -= 1;
                self.nesting -= 1;
                Expr::Where(focus, Box::new(criteria?))
            }
            "exists" | "empty" | "not" | "first" | "resolve" => {
                if self.peek() != Some(&Tok::RParen) {
                    return Err(self.error_here(format!("{name}() takes no arguments here")));
                }
                match name {
                    "exists" => Expr::Exists(focus),
                    "empty" => Expr::Empty(focus),
                    "not" => Expr::Not(focus),
                    "first" => Expr::First(focus),
                    _ => Expr::Resolve(focus),
                }
            }
            _ => {
                return Err(
                    self.error_at(name_offset, format!("function `{name}()` is not supported"))
                );
            }
        };
        self.expect(&Tok::RParen, "`)`")?;
        Ok(expr)
    }
}

fn type_operation(left: Expr, type_name: TypeName, is: bool) -> Expr {
    match (left, is) {
        (Expr::Resolve(reference), true) => Expr::ResolvesTo(reference, type_name.0),
        (left, true) => Expr::Is(Box::new(left), type_name),
        (left, false) => Expr::OfType(Box::new(left), type_name),
    }
}

// ---------------------------------------------------------------------------------------------
// Types

/// Choice-element suffixes: R4 JSON spells `value[x]` as `value` + the type name with its first
/// letter capitalised (json.html#choice); the second column is the type's own spelling.
const CHOICE_TYPES: &[(&str, &str)] = &[
    ("Base64Binary", "base64Binary"),
    ("Boolean", "boolean"),
    ("Canonical", "canonical"),
    ("Code", "code"),
    ("Date", "date"),
    ("DateTime", "dateTime"),
    ("Decimal", "decimal"),
    ("Id", "id"),
    ("Instant", "instant"),
    ("Integer", "integer"),
    ("Markdown", "markdown"),
    ("Oid", "oid"),
    ("PositiveInt", "positiveInt"),
    ("String", "string"),
    ("Time", "time"),
    ("UnsignedInt", "unsignedInt"),
    ("Uri", "uri"),
    ("Url", "url"),
    ("Uuid", "uuid"),
    ("Address", "Address"),
    ("Age", "Age"),
    ("Annotation", "Annotation"),
    ("Attachment", "Attachment"),
    ("CodeableConcept", "CodeableConcept"),
    ("Coding", "Coding"),
    ("ContactPoint", "ContactPoint"),
    ("Count", "Count"),
    ("Distance", "Distance"),
    ("Duration", "Duration"),
    ("HumanName", "HumanName"),
    ("Identifier", "Identifier"),
    ("Money", "Money"),
    ("Period", "Period"),
    ("Quantity", "Quantity"),
    ("Range", "Range"),
    ("Ratio", "Ratio"),
    ("Reference", "Reference"),
    ("SampledData", "SampledData"),
    ("Signature", "Signature"),
    ("Timing", "Timing"),
    ("ContactDetail", "ContactDetail"),
    ("Contributor", "Contributor"),
    ("DataRequirement", "DataRequirement"),
    ("Expression", "Expression"),
    ("ParameterDefinition", "ParameterDefinition"),
    ("RelatedArtifact", "RelatedArtifact"),
    ("TriggerDefinition", "TriggerDefinition"),
    ("UsageContext", "UsageContext"),
    ("Dosage", "Dosage"),
    ("Meta", "Meta"),
];

/// Specialisations in R4's type hierarchy that FHIRPath's `is`/`as` accept for their base.
const SUBTYPES: &[(&str, &str)] = &[
    ("Age", "Quantity"),
    ("Count", "Quantity"),
    ("Distance", "Quantity"),
    ("Duration", "Quantity"),
    ("MoneyQuantity", "Quantity"),
    ("SimpleQuantity", "Quantity"),
    ("code", "string"),
    ("id", "string"),
    ("markdown", "string"),
    ("url", "uri"),
    ("canonical", "uri"),
    ("oid", "uri"),
    ("uuid", "uri"),
    ("positiveInt", "integer"),
    ("unsignedInt", "integer"),
];

impl TypeName {
    fn new(name: String) -> Self {
        // FHIRPath's System types, as the definitions sometimes spell FHIR's primitives
        // (`value.as(DateTime)`).
        let fhir = match name.as_str() {
            "String" => "string",
            "Boolean" => "boolean",
            "Integer" => "integer",
            "Decimal" => "decimal",
            "Date" => "date",
            "DateTime" => "dateTime",
            "Time" => "time",
            _ => return Self(name),
        };
        Self(fhir.to_owned())
    }

    fn matches(&self, node: &Node<'_>) -> bool {
        let wanted = self.0.as_str();
        match node.type_hint {
            Some(hint) => {
                hint == wanted
                    || SUBTYPES
                        .iter()
                        .any(|(sub, base)| *sub == hint && *base == wanted)
            }
            None => shape_matches(wanted, node.value),
        }
    }
}

/// Whether a value without a type hint could be of type `wanted`: element types are not known at
/// run time, so we accept a compatible JSON shape.
fn shape_matches(wanted: &str, value: &Value) -> bool {
    let has = |keys: &[&str]| {
        value
            .as_object()
            .is_some_and(|object| keys.iter().any(|key| object.contains_key(*key)))
    };
    match wanted {
        "string" | "code" | "id" | "markdown" | "uri" | "url" | "canonical" | "oid" | "uuid"
        | "date" | "dateTime" | "instant" | "time" | "base64Binary" => value.is_string(),
        "boolean" => value.is_boolean(),
        "integer" | "positiveInt" | "unsignedInt" => value.is_i64() || value.is_u64(),
        "decimal" => value.is_number(),
        "Quantity" | "Age" | "Count" | "Distance" | "Duration" | "SimpleQuantity"
        | "MoneyQuantity" => value.get("value").is_some_and(Value::is_number),
        "Money" => has(&["currency"]) || value.get("value").is_some_and(Value::is_number),
        "Reference" => has(&["reference", "identifier", "display"]) && !has(&["coding"]),
        "Period" => has(&["start", "end"]),
        "Range" => has(&["low", "high"]),
        "Ratio" => has(&["numerator", "denominator"]),
        "CodeableConcept" => has(&["coding", "text"]) && !has(&["reference"]),
        "Coding" => has(&["code", "system"]) && !has(&["value", "coding"]),
        "Identifier" => {
            value.get("value").is_some_and(Value::is_string) && !has(&["reference", "rank"])
                || has(&["system"]) && !has(&["code", "value", "reference"])
        }
        "ContactPoint" => has(&["system", "value"]) && !has(&["code"]),
        "HumanName" => has(&["family", "given"]),
        "Address" => has(&["line", "city", "postalCode", "country", "state"]),
        "Attachment" => has(&["contentType", "url", "data"]),
        "SampledData" => has(&["origin"]),
        "Timing" => has(&["event", "repeat"]),
        // Otherwise a resource type (`ofType(Patient)` over contained resources).
        _ => value
            .get("resourceType")
            .and_then(Value::as_str)
            .is_some_and(|resource_type| resource_type == wanted),
    }
}

/// The resource type a literal reference points at: `Patient/1`, `Patient/1/_history/2`,
/// `https://x/fhir/Patient/1`; `#id` looks in the resource's `contained`.
fn reference_target_type<'a>(reference: &'a Value, resource: &'a Value) -> Option<&'a str> {
    let literal = reference.get("reference").and_then(Value::as_str);
    if let Some(local) = literal.and_then(|literal| literal.strip_prefix('#')) {
        return resource
            .get("contained")?
            .as_array()?
            .iter()
            .find(|contained| contained.get("id").and_then(Value::as_str) == Some(local))?
            .get("resourceType")?
            .as_str();
    }
    if let Some(literal) = literal
        && !literal.starts_with("urn:")
    {
        let path = literal.split(['?', '#']).next().unwrap_or(literal);
        let mut segments: Vec<&str> = path.split('/').filter(|s| !s.is_empty()).collect();
        if segments.len() >= 4 && segments.get(segments.len() - 2) == Some(&"_history") {
            segments.truncate(segments.len() - 2);
        }
        let candidate = segments
            .len()
            .checked_sub(2)
            .and_then(|i| segments.get(i))?;
        return candidate
            .starts_with(|c: char| c.is_ascii_uppercase())
            .then_some(*candidate);
    }
    // A logical or `urn:` reference says its target type only through `Reference.type`.
    reference.get("type").and_then(Value::as_str)
}

// ---------------------------------------------------------------------------------------------
// Evaluation

struct Context<'r, 'a> {
    resource_type: &'r str,
    resource: &'a Value,
}

fn push_flattened<'a>(out: &mut Vec<Node<'a>>, value: &'a Value, type_hint: Option<&'static str>) {
    match value {
        Value::Array(items) => out.extend(items.iter().filter(|item| !item.is_null()).map(
            |item| Node {
                value: item,
                type_hint,
            },
        )),
        Value::Null => {}
        _ => out.push(Node { value, type_hint }),
    }
}

/// Children named `name` of every node: the element itself, or a choice element's typed key.
fn members<'a>(nodes: &[Node<'a>], name: &str) -> Vec<Node<'a>> {
    let mut out = Vec::new();
    for node in nodes {
        let Some(object) = node.value.as_object() else {
            continue;
        };
        if let Some(value) = object.get(name) {
            push_flattened(&mut out, value, None);
            continue;
        }
        for (key, value) in object {
            if let Some(suffix) = key.strip_prefix(name)
                && let Some((_, type_name)) = CHOICE_TYPES.iter().find(|(json, _)| *json == suffix)
            {
                push_flattened(&mut out, value, Some(type_name));
            }
        }
    }
    out
}

fn singleton_bool(nodes: &[Node<'_>]) -> Option<bool> {
    match nodes {
        [node] => Some(node.value.as_bool().unwrap_or(true)),
        _ => None,
    }
}

fn json_equal(left: &Value, right: &Value) -> bool {
    match (left, right) {
        (Value::Number(a), Value::Number(b)) => a.as_f64() == b.as_f64(),
        _ => left == right,
    }
}

fn eval<'a>(expr: &'a Expr, context: &Context<'_, 'a>, focus: Node<'a>) -> Vec<Node<'a>> {
    match expr {
        Expr::This => vec![focus],
        Expr::Resource => vec![Node::plain(context.resource)],
        Expr::TypeRoot(name) => {
            if name == context.resource_type || name == "Resource" || name == "DomainResource" {
                vec![Node::plain(context.resource)]
            } else {
                Vec::new()
            }
        }
        Expr::Literal(value) => vec![Node::plain(value)],
        Expr::Member(inner, name) => members(&eval(inner, context, focus), name),
        Expr::Index(inner, index) => eval(inner, context, focus)
            .get(*index)
            .copied()
            .into_iter()
            .collect(),
        Expr::Union(items) => {
            let mut out: Vec<Node<'a>> = Vec::new();
            for item in items {
                for node in eval(item, context, focus) {
                    if !out.iter().any(|seen| seen.same(&node)) {
                        out.push(node);
                    }
                }
            }
            out
        }
        Expr::OfType(inner, type_name) => {
            let mut nodes = eval(inner, context, focus);
            nodes.retain(|node| type_name.matches(node));
            nodes
        }
        Expr::Is(inner, type_name) => match eval(inner, context, focus).as_slice() {
            [node] => vec![Node::boolean(type_name.matches(node))],
            _ => Vec::new(),
        },
        Expr::ResolvesTo(inner, type_name) => match eval(inner, context, focus).as_slice() {
            [node] => vec![Node::boolean(
                reference_target_type(node.value, context.resource) == Some(type_name.as_str()),
            )],
            _ => Vec::new(),
        },
        Expr::Where(inner, criteria) => {
            let mut nodes = eval(inner, context, focus);
            nodes.retain(|node| singleton_bool(&eval(criteria, context, *node)) == Some(true));
            nodes
        }
        Expr::Exists(inner) => vec![Node::boolean(!eval(inner, context, focus).is_empty())],
        Expr::Empty(inner) => vec![Node::boolean(eval(inner, context, focus).is_empty())],
        Expr::Not(inner) => singleton_bool(&eval(inner, context, focus))
            .map(|value| Node::boolean(!value))
            .into_iter()
            .collect(),
        Expr::First(inner) => eval(inner, context, focus)
            .first()
            .copied()
            .into_iter()
            .collect(),
        Expr::Equals {
            left,
            right,
            negate,
        } => {
            // fhirpath §6.1.1: empty operands give empty; collections compare item by item.
            let left = eval(left, context, focus);
            let right = eval(right, context, focus);
            if left.is_empty() || right.is_empty() {
                return Vec::new();
            }
            let equal = left.len() == right.len()
                && left
                    .iter()
                    .zip(&right)
                    .all(|(a, b)| json_equal(a.value, b.value));
            vec![Node::boolean(equal != *negate)]
        }
        Expr::And(left, right) => {
            // Three-valued logic (fhirpath §6.5.1): false wins over empty.
            let left = singleton_bool(&eval(left, context, focus));
            if left == Some(false) {
                return vec![Node::boolean(false)];
            }
            let right = singleton_bool(&eval(right, context, focus));
            match (left, right) {
                (_, Some(false)) => vec![Node::boolean(false)],
                (Some(true), Some(true)) => vec![Node::boolean(true)],
                _ => Vec::new(),
            }
        }
        // Refused at compile time; evaluating it would need the referenced resource.
        Expr::Resolve(_) => Vec::new(),
    }
}

impl fmt::Display for Expression {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.source)
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;
    use crate::fhir::search_params::{ParamType, SearchParamRegistry};

    fn values<'a>(expression: &'a Expression, resource: &'a Value) -> Vec<&'a Value> {
        let resource_type = resource["resourceType"].as_str().unwrap();
        expression
            .evaluate(resource_type, resource)
            .into_iter()
            .map(|node| node.value)
            .collect()
    }

    fn compile(source: &str) -> Expression {
        Expression::compile(source).unwrap()
    }

    #[test]
    fn deep_or_long_expressions_are_refused_not_overflowing() {
        let parens = format!("{}Patient{}", "(".repeat(5000), ")".repeat(5000));
        assert!(Expression::compile(&parens).is_err());
        let chain = format!("Patient{}", ".name".repeat(1500));
        assert!(Expression::compile(&chain).is_err());
        let ands = vec!["Patient.active"; 400].join(" and ");
        assert!(Expression::compile(&ands).is_err());
        let wheres = format!("Patient{}", ".name.where(given.exists())".repeat(100));
        assert!(Expression::compile(&wheres).is_err());
        assert!(Expression::compile(&"a".repeat(9000)).is_err());
        assert!(Expression::compile(&format!("Patient{}", ".name".repeat(40))).is_ok());
    }

    #[test]
    fn top_level_elements_name_what_an_expression_reads() {
        let read =
            |source: &str, resource_type: &str| compile(source).top_level_elements(resource_type);
        assert_eq!(
            read(
                "Observation.subject.where(resolve() is Patient)",
                "Observation"
            ),
            Some(vec!["subject".to_owned()])
        );
        assert_eq!(
            read(
                "(Observation.value as Quantity) | Observation.component.value",
                "Observation"
            ),
            Some(vec!["value".to_owned(), "component".to_owned()])
        );
        // Another type's root reads nothing of this one.
        assert_eq!(
            read("Patient.link.other | Observation.subject", "Patient"),
            Some(vec!["link".to_owned()])
        );
        assert_eq!(read("%resource.subject", "Observation"), None);
        assert_eq!(read("Observation", "Observation"), None);
        let (parent, name) = compile("Patient.contact[0].telecom")
            .split_last_member()
            .unwrap();
        assert_eq!(name, "telecom");
        let patient = json!({"resourceType": "Patient", "contact": [{"gender": "male"}]});
        assert_eq!(values(&parent, &patient), [&patient["contact"][0]]);
    }

    #[test]
    fn every_definition_compiles() {
        let registry = SearchParamRegistry::load().unwrap();
        let mut seen = std::collections::BTreeSet::new();
        let mut compiled = 0;
        let mut failures = Vec::new();
        for base in registry.bases() {
            for definition in registry.for_type(base).values() {
                if !seen.insert(definition.url.clone()) {
                    continue;
                }
                let expressions = definition.expression.iter().chain(
                    definition
                        .component
                        .iter()
                        .filter_map(|c| c.expression.as_ref()),
                );
                for expression in expressions {
                    match Expression::compile(expression) {
                        Ok(_) => compiled += 1,
                        Err(error) => failures.push((definition.code.clone(), error)),
                    }
                }
            }
        }
        // 1,281 definitions; `_content`, `_text` and `_query` have no expression. Every
        // expression (and every composite component's) is in the subset.
        assert_eq!(seen.len(), 1281);
        assert!(failures.is_empty(), "{failures:#?}");
        assert_eq!(compiled, 1278 + 80);
        // The only special parameter compiles as a path, though `near` cannot use it.
        let near = registry.get("Location", "near").unwrap();
        assert_eq!(near.param_type, ParamType::Special);
    }

    #[test]
    fn unsupported_expressions_are_refused_at_compile_time() {
        for source in [
            "Patient.name.select(given)",
            "Patient.active or Patient.deceased",
            "Observation.subject.resolve()",
            "Observation.value > 5",
            "Patient.name[i]",
            "Patient.name.",
            "Patient.name.where(given = 'a'",
            "%context.name",
            "Patient.name.family + 'x'",
            "'unterminated",
        ] {
            let error = Expression::compile(source).unwrap_err();
            assert_eq!(error.expression, source);
            assert!(!error.reason.is_empty(), "{source}");
        }
    }

    #[test]
    fn paths_flatten_and_filter_on_the_resource_type() {
        let patient = json!({
            "resourceType": "Patient",
            "name": [
                {"family": "Chalmers", "given": ["Peter", "James"]},
                {"given": ["Jim"]}
            ]
        });
        let given = compile("Patient.name.given | Practitioner.name.given");
        assert_eq!(
            values(&given, &patient),
            [&json!("Peter"), &json!("James"), &json!("Jim")]
        );
        assert!(values(&compile("Practitioner.name.given"), &patient).is_empty());
        assert_eq!(
            values(&compile("Resource.resourceType"), &patient),
            [&json!("Patient")]
        );
        assert_eq!(
            values(&compile("Patient.name[1].given"), &patient),
            [&json!("Jim")]
        );
        assert!(values(&compile("Patient.name[5].given"), &patient).is_empty());
        // A union removes duplicates (fhirpath §6.5: `|` merges as a set).
        assert_eq!(
            values(
                &compile("Patient.name.family | Patient.name.family"),
                &patient
            )
            .len(),
            1
        );
    }

    #[test]
    fn choice_elements_and_type_filters() {
        let observation = json!({
            "resourceType": "Observation",
            "valueQuantity": {"value": 185, "unit": "lbs"},
            "effectivePeriod": {"start": "2013-04-02"},
            "component": [
                {"valueString": "x"},
                {"valueCodeableConcept": {"text": "y"}}
            ]
        });
        let value = compile("Observation.value");
        let nodes = value.evaluate("Observation", &observation);
        assert_eq!(nodes.len(), 1);
        assert_eq!(nodes[0].type_hint, Some("Quantity"));
        assert_eq!(
            values(
                &compile("(Observation.value as Quantity).value"),
                &observation
            ),
            [&json!(185)]
        );
        assert!(values(&compile("Observation.value as string"), &observation).is_empty());
        assert_eq!(
            values(
                &compile("Observation.effective.as(Period).start"),
                &observation
            ),
            [&json!("2013-04-02")]
        );
        assert!(values(&compile("Observation.effective as dateTime"), &observation).is_empty());
        assert_eq!(
            values(
                &compile("Observation.component.value.ofType(string)"),
                &observation
            ),
            [&json!("x")]
        );
        assert_eq!(
            values(
                &compile("(Observation.component.value as CodeableConcept).text"),
                &observation
            ),
            [&json!("y")]
        );
        assert_eq!(
            values(&compile("Observation.value is Quantity"), &observation),
            [&json!(true)]
        );
        // Age is a Quantity in R4's type hierarchy; `DateTime` is FHIRPath's name for dateTime.
        let condition = json!({"resourceType": "Condition", "onsetAge": {"value": 3}, "abatementDateTime": "2020"});
        assert_eq!(
            values(&compile("Condition.onset.as(Quantity)"), &condition).len(),
            1
        );
        assert_eq!(
            values(&compile("Condition.abatement.as(DateTime)"), &condition).len(),
            1
        );
        assert!(values(&compile("Condition.onset.as(dateTime)"), &condition).is_empty());
    }

    #[test]
    fn a_choice_prefix_that_is_not_a_type_is_not_a_choice() {
        let resource = json!({"resourceType": "Basic", "statusReason": "x", "codeSet": "y"});
        assert!(values(&compile("Basic.status"), &resource).is_empty());
        assert!(values(&compile("Basic.code"), &resource).is_empty());
    }

    #[test]
    fn shapes_stand_in_for_unknown_element_types() {
        let resource = json!({
            "resourceType": "MedicationRequest",
            "medicationReference": {"reference": "Medication/1"},
            "subject": {"reference": "Patient/1"},
            "note": [{"text": "a"}],
            "x": [{"value": 3, "code": "mg"}, {"value": "abc", "system": "urn:s"}, "2020-01-01", true]
        });
        assert_eq!(
            values(
                &compile("MedicationRequest.subject as Reference"),
                &resource
            )
            .len(),
            1
        );
        assert_eq!(
            values(
                &compile("MedicationRequest.medication as Reference"),
                &resource
            )
            .len(),
            1
        );
        assert!(
            values(
                &compile("MedicationRequest.medication as CodeableConcept"),
                &resource
            )
            .is_empty()
        );
        assert_eq!(
            values(&compile("MedicationRequest.x as Quantity"), &resource),
            [&json!({"value": 3, "code": "mg"})]
        );
        assert_eq!(
            values(&compile("MedicationRequest.x as Identifier"), &resource).len(),
            1
        );
        assert_eq!(
            values(&compile("MedicationRequest.x as dateTime"), &resource),
            [&json!("2020-01-01")]
        );
        assert_eq!(
            values(&compile("MedicationRequest.x as boolean"), &resource),
            [&json!(true)]
        );
        assert!(values(&compile("MedicationRequest.note as Period"), &resource).is_empty());
    }

    #[test]
    fn where_with_literals_and_resolve() {
        let patient = json!({
            "resourceType": "Patient",
            "telecom": [
                {"system": "phone", "value": "555"},
                {"system": "email", "value": "a@b"}
            ],
            "contained": [{"resourceType": "Patient", "id": "p1"}, {"resourceType": "Practitioner", "id": "d1"}],
            "link": [
                {"other": {"reference": "Patient/1"}},
                {"other": {"reference": "RelatedPerson/2"}},
                {"other": {"reference": "https://example.org/fhir/Patient/3/_history/4"}},
                {"other": {"reference": "#p1"}},
                {"other": {"reference": "#d1"}},
                {"other": {"reference": "urn:uuid:0c3151bd-1cbf-4d64-b04d-cd9187a4c6e0"}},
                {"other": {"reference": "urn:uuid:0c3151bd-1cbf-4d64-b04d-cd9187a4c6e1", "type": "Patient"}},
                {"other": {"identifier": {"value": "x"}}}
            ]
        });
        assert_eq!(
            values(&compile("Patient.telecom.where(system='email')"), &patient),
            [&json!({"system": "email", "value": "a@b"})]
        );
        let to_patient = compile("Patient.link.other.where(resolve() is Patient)");
        let refs: Vec<_> = values(&to_patient, &patient)
            .into_iter()
            .map(|value| value["reference"].as_str().unwrap())
            .collect();
        assert_eq!(
            refs,
            [
                "Patient/1",
                "https://example.org/fhir/Patient/3/_history/4",
                "#p1",
                "urn:uuid:0c3151bd-1cbf-4d64-b04d-cd9187a4c6e1"
            ]
        );
        assert_eq!(
            values(
                &compile("Patient.link.other.where(resolve() is RelatedPerson)"),
                &patient
            )
            .len(),
            1
        );
        assert_eq!(
            values(
                &compile("Patient.telecom.where(system != 'email' and value = '555').value"),
                &patient
            ),
            [&json!("555")]
        );
        assert_eq!(
            values(
                &compile("Patient.telecom.where($this.system.exists()).count"),
                &patient
            )
            .len(),
            0
        );
    }

    #[test]
    fn deceased_is_always_a_boolean() {
        let deceased = compile("Patient.deceased.exists() and Patient.deceased != false");
        let cases = [
            (json!({"resourceType": "Patient"}), false),
            (
                json!({"resourceType": "Patient", "deceasedBoolean": false}),
                false,
            ),
            (
                json!({"resourceType": "Patient", "deceasedBoolean": true}),
                true,
            ),
            (
                json!({"resourceType": "Patient", "deceasedDateTime": "2015-02-14"}),
                true,
            ),
        ];
        for (patient, expected) in cases {
            assert_eq!(values(&deceased, &patient), [&json!(expected)], "{patient}");
        }
    }

    #[test]
    fn odd_shapes_never_fail() {
        let expression = compile(
            "(Observation.value as Quantity).value | Observation.subject.where(resolve() is Patient) | Observation.code.coding.where(system = 'x')",
        );
        for resource in [
            json!({"resourceType": "Observation", "valueQuantity": "oops", "subject": "Patient/1", "code": 3}),
            json!({"resourceType": "Observation", "valueQuantity": [null, 1], "subject": {"reference": 5}, "code": {"coding": [1, null, {"system": ["x"]}]}}),
            json!({"resourceType": "Observation", "subject": {"reference": "/"}}),
            json!(null),
            json!([1, 2]),
        ] {
            let _ = expression.evaluate("Observation", &resource);
        }
    }
}
