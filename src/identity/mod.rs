//! Identifiers: normalisation profiles and the countries the phone profile knows.

mod countries;

pub use countries::{Country, country, country_calling_code};
