//! Validated strings. Input is parsed into these at the edge, so the rest of the code never
//! sees a raw string it has not checked. Each parser takes the request field's name so the
//! error can name it.

use std::fmt;

use unicode_normalization::UnicodeNormalization as _;

use super::error::{Error, Result};

macro_rules! string_newtype {
    ($(#[$doc:meta])* $name:ident) => {
        $(#[$doc])*
        #[derive(Clone, PartialEq, Eq, PartialOrd, Ord, Hash, serde::Serialize, serde::Deserialize)]
        #[serde(transparent)]
        // Boxed, not `String`: 16 bytes instead of 24 and no spare capacity, in each of the
        // several a cached token holds, a million times over.
        pub struct $name(Box<str>);

        impl $name {
            /// The validated string.
            pub fn as_str(&self) -> &str {
                &self.0
            }

            /// Wraps a string read back from the store, where it was validated on the way in.
            pub fn from_trusted(value: String) -> Self {
                Self(value.into_boxed_str())
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }

        impl fmt::Debug for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                fmt::Debug::fmt(&self.0, f)
            }
        }

        impl AsRef<str> for $name {
            fn as_ref(&self) -> &str {
                &self.0
            }
        }

        // Sound: `Eq`, `Ord` and `Hash` are the boxed string's, so a set of these can be
        // searched by `&str` (a permission check is then a lookup, not a scan).
        impl std::borrow::Borrow<str> for $name {
            fn borrow(&self) -> &str {
                &self.0
            }
        }
    };
}

string_newtype!(
    /// A tenant's external id: 1-128 characters of `[A-Za-z0-9._:@-]`.
    TenantId
);
string_newtype!(
    /// A user's id at the identity provider: 1-255 bytes, printable, no surrounding spaces.
    UserId
);
string_newtype!(
    /// A role's name: 1-64 characters of `[A-Za-z0-9._:-]`.
    RoleName
);
string_newtype!(
    /// An application-defined permission: 1-128 characters of `[A-Za-z0-9._:*/-]`. tokend
    /// compares permissions as opaque strings: `*` has no special meaning to it.
    Permission
);
string_newtype!(
    /// A token's name: 1-100 characters, NFC-normalised, no control, format or
    /// bidirectional-override characters, no surrounding spaces.
    TokenName
);
string_newtype!(
    /// A visibility group: 1-128 characters, printable, no surrounding spaces.
    Group
);

/// The id of tokend's own tenant.
pub const SYSTEM_TENANT: &str = "system";

fn charset_rule(
    field: &str,
    value: &str,
    max: usize,
    allowed: impl Fn(u8) -> bool,
    charset: &str,
) -> Result<()> {
    if value.is_empty() || value.len() > max || !value.bytes().all(allowed) {
        return Err(Error::invalid(
            field,
            format!("must be 1-{max} characters of {charset}"),
        ));
    }
    Ok(())
}

/// Control characters, and the invisible formatting and bidirectional controls that make a
/// name render as something it is not.
fn is_deceptive(c: char) -> bool {
    c.is_control()
        || matches!(c,
            '\u{200B}'..='\u{200F}' // zero-width spaces and joiners, LRM, RLM
            | '\u{202A}'..='\u{202E}' // bidi embeddings and overrides
            | '\u{2060}'..='\u{206F}' // word joiner, invisible operators, bidi isolates
            | '\u{FEFF}' // zero-width no-break space
            | '\u{FFF9}'..='\u{FFFB}' // interlinear annotations
        )
}

fn printable_rule(field: &str, value: &str, max: usize, unit: &str) -> Result<()> {
    let len = if unit == "bytes" {
        value.len()
    } else {
        value.chars().count()
    };
    if value.is_empty() || len > max {
        return Err(Error::invalid(field, format!("must be 1-{max} {unit}")));
    }
    if value.chars().any(is_deceptive) {
        return Err(Error::invalid(
            field,
            "must not contain control, zero-width or bidirectional-override characters",
        ));
    }
    if value.trim() != value {
        return Err(Error::invalid(
            field,
            "must not start or end with white space",
        ));
    }
    Ok(())
}

impl TenantId {
    /// Parses request field `field`.
    pub fn parse(field: &str, value: &str) -> Result<Self> {
        charset_rule(
            field,
            value,
            128,
            |b| b.is_ascii_alphanumeric() || b"._:@-".contains(&b),
            "[A-Za-z0-9._:@-]",
        )?;
        Ok(Self(value.into()))
    }

    /// tokend's own tenant.
    pub fn system() -> Self {
        Self(SYSTEM_TENANT.into())
    }

    /// Whether this is tokend's own tenant.
    pub fn is_system(&self) -> bool {
        &*self.0 == SYSTEM_TENANT
    }
}

impl UserId {
    /// Parses request field `field`.
    pub fn parse(field: &str, value: &str) -> Result<Self> {
        printable_rule(field, value, 255, "bytes")?;
        Ok(Self(value.into()))
    }
}

impl RoleName {
    /// Parses request field `field`.
    pub fn parse(field: &str, value: &str) -> Result<Self> {
        charset_rule(
            field,
            value,
            64,
            |b| b.is_ascii_alphanumeric() || b"._:-".contains(&b),
            "[A-Za-z0-9._:-]",
        )?;
        Ok(Self(value.into()))
    }
}

impl Permission {
    /// Parses request field `field`.
    pub fn parse(field: &str, value: &str) -> Result<Self> {
        charset_rule(
            field,
            value,
            128,
            |b| b.is_ascii_alphanumeric() || b"._:*/-".contains(&b),
            "[A-Za-z0-9._:*/-]",
        )?;
        Ok(Self(value.into()))
    }

    /// A permission tokend defines itself, `place` being its place in the list of them
    /// (under 16).
    pub const fn builtin(value: &'static str, place: u8) -> BuiltinPermission {
        // Past the bits of a `Builtins`, the shift would wrap onto another permission's bit
        // in a release build; the permissions are `const`s, so this stops the build instead.
        assert!(place < 16, "a builtin permission's place must be under 16");
        BuiltinPermission(value, place)
    }

    /// Whether this permission is in tokend's reserved `tokend.` namespace.
    pub fn is_reserved(&self) -> bool {
        self.0.starts_with("tokend.")
    }
}

impl TokenName {
    /// Parses request field `field`, normalising to NFC first so that two spellings of the
    /// same name collide.
    pub fn parse(field: &str, value: &str) -> Result<Self> {
        let normalised: String = value.nfc().collect();
        printable_rule(field, &normalised, 100, "characters")?;
        Ok(Self(normalised.into_boxed_str()))
    }

    /// The form names are compared in: case-folded, for uniqueness and search.
    pub fn key(&self) -> String {
        self.0.to_lowercase()
    }
}

impl Group {
    /// Parses request field `field`.
    pub fn parse(field: &str, value: &str) -> Result<Self> {
        printable_rule(field, value, 128, "characters")?;
        Ok(Self(value.into()))
    }
}

/// One of tokend's own permissions, usable in `const`s, and its place among them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BuiltinPermission(&'static str, u8);

impl BuiltinPermission {
    /// The permission string.
    pub const fn as_str(self) -> &'static str {
        self.0
    }

    /// Its bit in a [`Builtins`].
    const fn bit(self) -> u16 {
        1 << self.1
    }
}

/// Which of tokend's own permissions a set holds, one bit each. A caller's rights are
/// checked on every call it makes, and a bit test costs less than searching a set of
/// strings for one.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Builtins(u16);

impl Builtins {
    /// These and `permission`.
    pub const fn with(self, permission: BuiltinPermission) -> Self {
        Self(self.0 | permission.bit())
    }

    /// Whether `permission` is among these.
    pub const fn has(self, permission: BuiltinPermission) -> bool {
        self.0 & permission.bit() != 0
    }
}

impl fmt::Display for BuiltinPermission {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rule_of(err: Error) -> String {
        err.to_string()
    }

    #[test]
    fn a_name_is_a_boxed_str_not_a_string() {
        // A cached token holds up to four of these; a `String` would be 8 bytes more each.
        assert_eq!(std::mem::size_of::<TenantId>(), 16);
        assert_eq!(std::mem::size_of::<Option<UserId>>(), 16);
        let parsed = TenantId::parse("tenant_id", "acme").unwrap();
        assert_eq!(parsed.as_str(), "acme");
        assert_eq!(TenantId::from_trusted("acme".to_owned()), parsed);
    }

    #[test]
    fn tenant_ids_name_the_field_and_charset() {
        assert!(TenantId::parse("tenant_id", "acme-01").is_ok());
        assert!(TenantId::parse("tenant_id", "7f0c1d9e-0c1a-4f3b-9a43-2b2f3f9f0a11").is_ok());
        let err = rule_of(TenantId::parse("tenant_id", "ac me").unwrap_err());
        assert_eq!(
            err,
            "tenant_id: must be 1-128 characters of [A-Za-z0-9._:@-]"
        );
        assert!(TenantId::parse("tenant_id", "").is_err());
        assert!(TenantId::parse("tenant_id", &"a".repeat(129)).is_err());
        assert!(TenantId::parse("tenant_id", "x' OR 1=1 --").is_err());
    }

    #[test]
    fn permissions_allow_the_documented_charset_only() {
        for ok in [
            "entities:read",
            "reports.export",
            "a/b*",
            "tokend.introspect",
        ] {
            assert!(Permission::parse("scopes[0]", ok).is_ok(), "{ok}");
        }
        for bad in ["", "has space", "ünïcode", "semi;colon"] {
            assert!(Permission::parse("scopes[0]", bad).is_err(), "{bad}");
        }
        assert!(Permission::parse("p", &"a".repeat(128)).is_ok());
        assert!(Permission::parse("p", &"a".repeat(129)).is_err());
    }

    #[test]
    fn token_names_reject_deceptive_characters() {
        assert!(TokenName::parse("name", "CI deploy key").is_ok());
        assert!(TokenName::parse("name", "ключ 🔑").is_ok());
        for bad in [
            "",
            " padded",
            "tab\tname",
            "nul\0",
            "rtl\u{202E}cod.exe",
            "zw\u{200B}sp",
        ] {
            assert!(TokenName::parse("name", bad).is_err(), "{bad:?}");
        }
        assert!(TokenName::parse("name", &"é".repeat(100)).is_ok());
        assert!(TokenName::parse("name", &"é".repeat(101)).is_err());
    }

    #[test]
    fn token_names_are_nfc_normalised_and_compared_case_insensitively() {
        let composed = TokenName::parse("name", "Caf\u{e9}").unwrap();
        let decomposed = TokenName::parse("name", "Cafe\u{301}").unwrap();
        assert_eq!(composed, decomposed);
        assert_eq!(
            composed.key(),
            TokenName::parse("name", "CAFÉ").unwrap().key()
        );
    }

    #[test]
    fn user_ids_are_printable_and_bounded_in_bytes() {
        assert!(UserId::parse("user_id", "auth0|5f7c8ec7c33c6c004bbafe82").is_ok());
        assert!(UserId::parse("user_id", &"a".repeat(255)).is_ok());
        assert!(UserId::parse("user_id", &"a".repeat(256)).is_err());
        assert!(UserId::parse("user_id", "line\nbreak").is_err());
    }

    #[test]
    fn reserved_permissions_are_recognised() {
        assert!(
            Permission::parse("p", "tokend.act_as")
                .unwrap()
                .is_reserved()
        );
        assert!(
            !Permission::parse("p", "tokendx.read")
                .unwrap()
                .is_reserved()
        );
    }
}
