//! The one place a storage failure becomes an HTTP status.

use axum::http::StatusCode;
use breakwater_runtime::http::ApiError;

use crate::storage::StorageError;

impl From<StorageError> for ApiError {
    fn from(err: StorageError) -> Self {
        match err {
            StorageError::EmailTaken => ApiError::new(StatusCode::CONFLICT, "Email already in use"),
            other => {
                // Logged here, where it is handled; the client gets no database details.
                tracing::error!(error = %other, "storage failure");
                ApiError::internal("Internal storage error")
            }
        }
    }
}
