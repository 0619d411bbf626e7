//! The route table of the FHIR REST API under `/fhir` (http.html): each path with the
//! handlers of its methods, in the order that decides which path wins where two patterns
//! could match, and a 405 OperationOutcome for any other method on a known path.

use actix_web::{HttpRequest, HttpResponse, web};

use super::{bundle, everything, fhir, search};
use crate::error::AppError;

pub fn fhir_routes(cfg: &mut web::ServiceConfig) {
    cfg.service(
        web::scope("/fhir")
            .route("/metadata", web::get().to(fhir::metadata))
            // Before `/{type}` and `/{type}/{id}`, which would otherwise take `_history`
            // as a type or an id.
            .service(
                web::resource("/_history")
                    .route(web::get().to(fhir::system_history))
                    .default_service(web::to(method_not_allowed)),
            )
            .service(
                web::resource("/{type}/_history")
                    .route(web::get().to(fhir::type_history))
                    .default_service(web::to(method_not_allowed)),
            )
            .service(
                web::resource("")
                    .route(web::get().to(search::search_system))
                    .route(web::post().to(bundle::process))
                    .default_service(web::to(method_not_allowed)),
            )
            .service(
                web::resource("/{type}")
                    .route(web::get().to(search::search_type))
                    .route(web::post().to(fhir::create))
                    .route(web::put().to(bundle::conditional_update))
                    .route(web::delete().to(bundle::conditional_delete))
                    .default_service(web::to(method_not_allowed)),
            )
            .service(
                web::resource("/{type}/_search")
                    .route(web::post().to(search::search_type_post))
                    .default_service(web::to(method_not_allowed)),
            )
            // Before `/{type}/{id}`: an operation on an instance (operations.html).
            .service(
                web::resource("/{type}/{id}/$everything")
                    .route(web::get().to(everything::everything))
                    .route(web::post().to(everything::everything_post))
                    .default_service(web::to(method_not_allowed)),
            )
            .service(
                web::resource("/{type}/{id}")
                    .route(web::get().to(fhir::read))
                    .route(web::put().to(fhir::update))
                    .route(web::patch().to(fhir::patch))
                    .route(web::delete().to(fhir::delete))
                    .default_service(web::to(method_not_allowed)),
            )
            .service(
                web::resource("/{type}/{id}/_history")
                    .route(web::get().to(fhir::history))
                    .default_service(web::to(method_not_allowed)),
            )
            // After `/{type}/{id}/_history` and `/{type}/{id}/$everything`, which it would
            // otherwise take as a compartment search of the type `_history`.
            .service(
                web::resource("/{compartment}/{id}/{type}")
                    .route(web::get().to(search::search_compartment))
                    .default_service(web::to(method_not_allowed)),
            )
            .service(
                web::resource("/{type}/{id}/_history/{vid}")
                    .route(web::get().to(fhir::vread))
                    .default_service(web::to(method_not_allowed)),
            ),
    );
}

async fn method_not_allowed(req: HttpRequest) -> Result<HttpResponse, AppError> {
    Err(AppError::MethodNotAllowed(format!(
        "{} is not supported on {}",
        req.method(),
        req.path()
    )))
}
