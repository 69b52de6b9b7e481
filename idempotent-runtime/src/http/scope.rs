//! The scope of a key read from a request: shared by every client, or one tenant's.

/// The scope the HTTP layers put a request's key in: `"http"`, shared by every client, or
/// the tenant's own (`scope_with`), so that two tenants never share a key. A layer of your
/// own that uses it shares its records with the tower layer and the actix middleware.
///
/// ```
/// use idempotent_runtime::http::request_scope;
///
/// assert_eq!(request_scope(None), "http");
/// assert_ne!(request_scope(Some("acme")), request_scope(Some("globex")));
/// ```
pub fn request_scope(tenant: Option<&str>) -> String {
    tenant_scope("http", tenant)
}

/// `prefix`, or `prefix:tenant` with the tenant escaped so that it cannot contain the
/// scope separator (`|`) or be confused with an escape (`%`).
pub(crate) fn tenant_scope(prefix: &str, tenant: Option<&str>) -> String {
    match tenant {
        None => prefix.to_owned(),
        Some(tenant) => {
            let mut s = String::with_capacity(prefix.len() + 1 + tenant.len());
            s.push_str(prefix);
            s.push(':');
            for c in tenant.chars() {
                match c {
                    '|' => s.push_str("%7C"),
                    '%' => s.push_str("%25"),
                    c => s.push(c),
                }
            }
            s
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tenants_are_escaped_apart() {
        assert_eq!(tenant_scope("http", None), "http");
        assert_eq!(tenant_scope("http", Some("acme")), "http:acme");
        assert_eq!(tenant_scope("grpc", Some("a|b%")), "grpc:a%7Cb%25");
        assert_ne!(
            tenant_scope("http", Some("a|b")),
            tenant_scope("http", Some("a%7Cb"))
        );
    }
}
