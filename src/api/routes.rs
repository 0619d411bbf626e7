//! The route table: every operation of the API (the FHIR REST interactions under `/fhir`,
//! http.html; the ledger; health; SMART discovery; the OpenAPI document), each registered
//! with the documentation its path and method are taken from ([`Registry`]), and the OpenAPI
//! document built from the same registrations. Order decides which path wins where two
//! patterns could match; a known path answers 405 with an OperationOutcome to any other
//! method.

use actix_web::http::header;
use actix_web::{HttpRequest, HttpResponse, web};

use super::registry::Registry;
use super::{
    bundle, everything, export, fhir, health, import, ledger, openapi, portal, search, smart,
};
use crate::error::AppError;

/// Every documented operation, in matching order.
fn table() -> Registry {
    Registry::new(|| web::to(method_not_allowed))
        .serve::<fhir::__path_metadata, _, _>(fhir::metadata)
        // Bulk export, before every pattern that would take `$export…` as a type or an id.
        .serve::<export::__path_export_system, _, _>(export::export_system)
        .serve::<export::__path_export_system_post, _, _>(export::export_system_post)
        .serve::<export::__path_export_patients, _, _>(export::export_patients)
        .serve::<export::__path_export_patients_post, _, _>(export::export_patients_post)
        .serve::<export::__path_export_group, _, _>(export::export_group)
        .serve::<export::__path_export_group_post, _, _>(export::export_group_post)
        .serve::<export::__path_export_status, _, _>(export::export_status)
        .serve::<export::__path_export_cancel, _, _>(export::export_cancel)
        .serve::<export::__path_export_file, _, _>(export::export_file)
        .serve::<import::__path_import_ndjson, _, _>(import::import_ndjson)
        // Before `/{type}` and `/{type}/{id}`, which would otherwise take `_history` as a
        // type or an id.
        .serve::<fhir::__path_system_history, _, _>(fhir::system_history)
        .serve::<fhir::__path_type_history, _, _>(fhir::type_history)
        .serve::<search::__path_search_system, _, _>(search::search_system)
        .serve::<bundle::__path_process, _, _>(bundle::process)
        .serve::<search::__path_search_type, _, _>(search::search_type)
        .serve::<fhir::__path_create, _, _>(fhir::create)
        .serve::<bundle::__path_conditional_update, _, _>(bundle::conditional_update)
        .serve::<bundle::__path_conditional_delete, _, _>(bundle::conditional_delete)
        .serve::<search::__path_search_type_post, _, _>(search::search_type_post)
        // Before `/{type}/{id}`: an operation on an instance (operations.html).
        .serve::<everything::__path_everything, _, _>(everything::everything)
        .serve::<everything::__path_everything_post, _, _>(everything::everything_post)
        .serve::<fhir::__path_read, _, _>(fhir::read)
        .serve::<fhir::__path_update, _, _>(fhir::update)
        .serve::<fhir::__path_patch, _, _>(fhir::patch)
        .serve::<fhir::__path_delete, _, _>(fhir::delete)
        .serve::<fhir::__path_history, _, _>(fhir::history)
        // After `/{type}/{id}/_history` and `/{type}/{id}/$everything`, which it would
        // otherwise take as a compartment search of the type `_history`.
        .serve::<search::__path_search_compartment, _, _>(search::search_compartment)
        .serve::<fhir::__path_vread, _, _>(fhir::vread)
        .serve::<ledger::__path_checkpoint, _, _>(ledger::checkpoint)
        .serve::<ledger::__path_cosigned_checkpoint, _, _>(ledger::cosigned_checkpoint)
        .serve::<ledger::__path_witnesses, _, _>(ledger::witnesses)
        .serve::<ledger::__path_key, _, _>(ledger::key)
        .serve::<ledger::__path_keys, _, _>(ledger::keys)
        .serve::<ledger::__path_entries, _, _>(ledger::entries)
        .serve::<ledger::__path_entry, _, _>(ledger::entry)
        .serve::<ledger::__path_receipt, _, _>(ledger::receipt)
        .serve::<ledger::__path_inclusion_proof, _, _>(ledger::inclusion_proof)
        .serve::<ledger::__path_consistency_proof, _, _>(ledger::consistency_proof)
        // Documented as `/ledger/tile/entries/{N}` and `/ledger/tile/{L}/{N}`; the index may
        // have several `/`-separated groups and a `.p/{W}` suffix (C2SP tlog-tiles), so the
        // router matches the whole tail, entry bundles first.
        .serve_matching::<ledger::__path_entry_bundle, _, _>(
            "/ledger/tile/entries/{tail:.*}",
            ledger::entry_bundle,
        )
        .serve_matching::<ledger::__path_tile, _, _>("/ledger/tile/{tail:.*}", ledger::tile)
        .serve::<health::__path_healthz, _, _>(health::healthz)
        .serve::<health::__path_readyz, _, _>(health::readyz)
        .serve::<health::__path_metrics, _, _>(health::metrics)
        .serve::<smart::__path_smart_configuration, _, _>(smart::smart_configuration)
        .serve::<smart::__path_jwks, _, _>(smart::jwks)
        .serve::<__path_openapi_json, _, _>(openapi_json)
}

/// Registers every route of the table, and the pages of the document's viewer (files, not
/// operations: they are not in the document).
pub fn configure(cfg: &mut web::ServiceConfig) {
    cfg.service(table().services());
    openapi::viewer_routes(cfg);
    portal::routes(cfg);
}

/// The OpenAPI document as served (pretty-printed, ending with a newline, like the committed
/// file), built once from the table: it depends on nothing but the build.
pub fn document_json() -> &'static str {
    static DOCUMENT: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    DOCUMENT.get_or_init(|| openapi::document(table().paths()))
}

/// This OpenAPI document.
#[utoipa::path(get, path = "/openapi.json", tag = "operations",
    responses((status = 200, description = "OpenAPI 3.1 document", content_type = "application/json")))]
pub async fn openapi_json() -> HttpResponse {
    HttpResponse::Ok()
        .insert_header((header::CONTENT_TYPE, "application/json"))
        .body(document_json())
}

async fn method_not_allowed(req: HttpRequest) -> Result<HttpResponse, AppError> {
    Err(AppError::MethodNotAllowed(format!(
        "{} is not supported on {}",
        req.method(),
        req.path()
    )))
}
