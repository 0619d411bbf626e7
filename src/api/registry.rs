//! Routes and their OpenAPI documentation from one registration: a handler is added with the
//! `#[utoipa::path]` item that documents it, and the path and methods it is served at are
//! taken from that documentation. So a route cannot exist without its documentation, nor the
//! documentation without its route, and the two cannot name different paths or methods.

use actix_web::dev::HttpServiceFactory;
use actix_web::http::Method;
use actix_web::{FromRequest, Handler, Resource, Responder, Route, web};
use utoipa::__dev::Tags;
use utoipa::openapi::path::{HttpMethod, PathItem, Paths, PathsBuilder};

/// Routes being registered, grouped by path in the order they were first added (actix tries
/// resources in that order, so where two patterns could match, the one added first wins),
/// and the documentation of each.
pub struct Registry {
    resources: Vec<(String, Resource)>,
    /// How to document each route: kept as functions, so that an app built for serving (one
    /// per worker, and per test) does not build the document it never uses.
    documented: Vec<fn(PathsBuilder) -> PathsBuilder>,
    /// What a known path answers to a method it does not serve.
    method_not_allowed: fn() -> Route,
}

impl Registry {
    /// An empty registry; `method_not_allowed` builds the route every resource falls back to.
    pub fn new(method_not_allowed: fn() -> Route) -> Self {
        Self {
            resources: Vec::new(),
            documented: Vec::new(),
            method_not_allowed,
        }
    }

    /// Serves `handler` at the path and methods its documentation `Doc` gives.
    pub fn serve<Doc, F, Args>(self, handler: F) -> Self
    where
        Doc: utoipa::Path + for<'t> Tags<'t>,
        F: Handler<Args>,
        Args: FromRequest + 'static,
        F::Output: Responder + 'static,
    {
        let path = Doc::path();
        self.serve_matching::<Doc, F, Args>(&path, handler)
    }

    /// [`Self::serve`], matching requests by `pattern` where the router needs another form
    /// than the documented path (a tail that holds slashes, documented by its parts).
    pub fn serve_matching<Doc, F, Args>(mut self, pattern: &str, handler: F) -> Self
    where
        Doc: utoipa::Path + for<'t> Tags<'t>,
        F: Handler<Args>,
        Args: FromRequest + 'static,
        F::Output: Responder + 'static,
    {
        let at = match self.resources.iter().position(|(p, _)| p == pattern) {
            Some(at) => at,
            None => {
                self.resources
                    .push((pattern.to_owned(), web::resource(pattern)));
                self.resources.len() - 1
            }
        };
        let (_, mut resource) = self.resources.remove(at);
        for method in Doc::methods() {
            resource = resource.route(
                web::route()
                    .method(actix_method(&method))
                    .to(handler.clone()),
            );
        }
        self.resources.insert(at, (pattern.to_owned(), resource));
        self.documented.push(document::<Doc>);
        self
    }

    /// The routes, each path answering 405 to the methods it does not serve.
    pub fn services(self) -> impl HttpServiceFactory {
        let fallback = self.method_not_allowed;
        self.resources
            .into_iter()
            .map(move |(_, resource)| resource.default_service(fallback()))
            .collect::<Vec<_>>()
    }

    /// The documentation of every route registered.
    pub fn paths(self) -> Paths {
        self.documented
            .into_iter()
            .fold(PathsBuilder::new(), |paths, document| document(paths))
            .build()
    }
}

/// Adds `Doc`'s operation at its path, under each of its methods.
fn document<Doc>(mut paths: PathsBuilder) -> PathsBuilder
where
    Doc: utoipa::Path + for<'t> Tags<'t>,
{
    let mut operation = Doc::operation();
    // The tags the documentation names (`tag = "fhir"`), which utoipa keeps apart from the
    // operation for its own document builder to add.
    operation
        .tags
        .get_or_insert_with(Vec::new)
        .extend(Doc::tags().into_iter().map(str::to_owned));
    for method in Doc::methods() {
        paths = paths.path(Doc::path(), PathItem::new(method, operation.clone()));
    }
    paths
}

fn actix_method(method: &HttpMethod) -> Method {
    match method {
        HttpMethod::Get => Method::GET,
        HttpMethod::Post => Method::POST,
        HttpMethod::Put => Method::PUT,
        HttpMethod::Delete => Method::DELETE,
        HttpMethod::Options => Method::OPTIONS,
        HttpMethod::Head => Method::HEAD,
        HttpMethod::Patch => Method::PATCH,
        HttpMethod::Trace => Method::TRACE,
    }
}
