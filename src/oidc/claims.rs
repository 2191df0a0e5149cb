//! GitLab CI ID token claims, parsed once into typed fields.
//!
//! The payload of a verified ID token is deserialized exactly once, into
//! [`GitLabClaims`]. Verification (`iss`, `aud`, `exp`, …) and authorization
//! (policy bindings, CEL) both read this one value, so the two can never see
//! different JSON (RFC 7519 §4 duplicate members are rejected by serde derive).
//!
//! Types follow what GitLab emits (`lib/gitlab/ci/jwt_v2.rb`): ids are JSON
//! strings of digits, `runner_id` is an integer, booleans are the strings
//! `"true"`/`"false"`. A wrong JSON type is an error, never "absent".

use std::fmt;

use serde::{Deserialize, Deserializer, Serialize, Serializer, de};

/// A GitLab numeric id (project, namespace, pipeline, job, user), carried as a
/// JSON string of ASCII digits in ID tokens.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct GitLabId(pub u64);

impl fmt::Display for GitLabId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

impl GitLabId {
    /// Parses the string form GitLab uses: one or more ASCII digits, no sign,
    /// no leading zeros (except "0"), no whitespace.
    pub fn parse(s: &str) -> Option<Self> {
        if s.is_empty() || s.len() > 20 || !s.bytes().all(|b| b.is_ascii_digit()) {
            return None;
        }
        if s.len() > 1 && s.starts_with('0') {
            return None;
        }
        s.parse().ok().map(GitLabId)
    }
}

/// Serialized the way GitLab sends it: a string of digits.
impl Serialize for GitLabId {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(&self.0)
    }
}

impl<'de> Deserialize<'de> for GitLabId {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl de::Visitor<'_> for V {
            type Value = GitLabId;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a string of decimal digits")
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<GitLabId, E> {
                GitLabId::parse(v).ok_or_else(|| E::invalid_value(de::Unexpected::Str(v), &self))
            }
        }
        d.deserialize_str(V)
    }
}

/// GitLab's string booleans: exactly `"true"` or `"false"`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StrBool(pub bool);

/// Serialized the way GitLab sends it: `"true"` or `"false"`.
impl Serialize for StrBool {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(if self.0 { "true" } else { "false" })
    }
}

impl<'de> Deserialize<'de> for StrBool {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl de::Visitor<'_> for V {
            type Value = StrBool;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("the string \"true\" or \"false\"")
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<StrBool, E> {
                match v {
                    "true" => Ok(StrBool(true)),
                    "false" => Ok(StrBool(false)),
                    _ => Err(E::invalid_value(de::Unexpected::Str(v), &self)),
                }
            }
        }
        d.deserialize_str(V)
    }
}

/// A NumericDate (RFC 7519 §2) restricted to whole seconds, as GitLab emits.
/// Strings, floats, booleans and null are type errors (cf. CVE-2026-25537).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Deserialize, Serialize)]
#[serde(transparent)]
pub struct NumericDate(pub i64);

/// The `aud` claim: a string or a non-empty array of strings (RFC 7519 §4.1.3).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Audience(pub Vec<String>);

impl Audience {
    /// True when any audience value equals `want` exactly.
    pub fn contains(&self, want: &str) -> bool {
        self.0.iter().any(|a| a == want)
    }
}

/// Serialized as an array (which deserializes back to the same value).
impl Serialize for Audience {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        self.0.serialize(s)
    }
}

impl<'de> Deserialize<'de> for Audience {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            One(String),
            Many(Vec<String>),
        }
        let raw = Raw::deserialize(d)
            .map_err(|_| de::Error::custom("aud must be a string or an array of strings"))?;
        let v = match raw {
            Raw::One(s) => vec![s],
            Raw::Many(v) => v,
        };
        if v.is_empty() || v.iter().any(String::is_empty) {
            return Err(de::Error::custom("aud must not be empty"));
        }
        Ok(Audience(v))
    }
}

/// `ref_type`: what kind of git ref the pipeline runs for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum RefType {
    /// A branch (`refs/heads/…`).
    Branch,
    /// A tag (`refs/tags/…`).
    Tag,
}

impl RefType {
    /// The claim's string form.
    pub fn as_str(self) -> &'static str {
        match self {
            RefType::Branch => "branch",
            RefType::Tag => "tag",
        }
    }
}

/// The claims of a GitLab CI ID token (JWT v2), typed exactly as GitLab
/// emits them. Unknown claims are ignored; duplicate members are an error.
///
/// Fields marked "always" in GitLab's documentation are required here.
/// Claims GitLab added in later releases (`job_project_*` in 18.4,
/// `job_source` in 18.9, …) are optional so older instances still work;
/// policies that bind them simply do not match when they are absent.
///
/// `Serialize` writes GitLab's own types (ids and booleans as strings), so
/// the JSON recorded in audit details parses back into the same value.
#[derive(Debug, Clone, Deserialize, Serialize)]
pub struct GitLabClaims {
    /// Issuer URL; must equal the configured issuer exactly.
    pub iss: String,
    /// Subject (`project_path:…:ref_type:…:ref:…` by default). Never parsed.
    pub sub: String,
    /// Audience(s) the job requested in `id_tokens:`.
    pub aud: Audience,
    /// Expiry (seconds since the epoch). Required.
    pub exp: NumericDate,
    /// Issued-at. Required: the maximum token age is measured from it.
    pub iat: NumericDate,
    /// Not-before (GitLab sets `iat - 5`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub nbf: Option<NumericDate>,
    /// Unique token id (UUID v4); the replay cache keys on it.
    pub jti: String,

    /// Project the pipeline belongs to (the *source fork* in fork MR pipelines).
    pub project_id: GitLabId,
    /// Full path of that project. Display only: paths can be reused.
    pub project_path: String,
    /// Namespace of that project.
    pub namespace_id: GitLabId,
    /// Full path of that namespace.
    pub namespace_path: String,
    /// Project the job actually runs in (GitLab ≥ 18.4).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub job_project_id: Option<GitLabId>,
    /// Path of the project the job runs in.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub job_project_path: Option<String>,
    /// Namespace of the project the job runs in.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub job_namespace_id: Option<GitLabId>,
    /// Path of that namespace.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub job_namespace_path: Option<String>,

    /// User who triggered the job; GitLab sends `""` when there is none.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user_id: Option<String>,
    /// Username (mutable).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user_login: Option<String>,
    /// Email (mutable).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user_email: Option<String>,
    /// The user's maximum access level on the project, lower-cased.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user_access_level: Option<String>,

    /// Pipeline id.
    pub pipeline_id: GitLabId,
    /// What started the pipeline (`push`, `merge_request_event`, `schedule`, …).
    pub pipeline_source: String,
    /// Job id.
    pub job_id: GitLabId,
    /// Branch or tag name (no `refs/` prefix).
    #[serde(rename = "ref")]
    pub git_ref: String,
    /// Whether `ref` is a branch or a tag.
    pub ref_type: RefType,
    /// Fully qualified ref (`refs/heads/main`), GitLab ≥ 16.0.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ref_path: Option<String>,
    /// Whether the ref is protected.
    pub ref_protected: StrBool,
    /// Commit SHA.
    pub sha: String,

    /// Environment name, when the job has `environment:`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub environment: Option<String>,
    /// Whether that environment is protected.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub environment_protected: Option<StrBool>,
    /// `production`, `staging`, `testing`, `development` or `other`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub deployment_tier: Option<String>,
    /// `start`, `prepare`, `stop`, `verify` or `access`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub environment_action: Option<String>,

    /// Runner id: the one integer-typed custom claim.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub runner_id: Option<i64>,
    /// `gitlab-hosted` or `self-hosted`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub runner_environment: Option<String>,
    /// `private`, `internal` or `public`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub project_visibility: Option<String>,
    /// Where the pipeline definition came from; null unless it lives in the same project.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ci_config_ref_uri: Option<String>,
    /// SHA of that definition.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ci_config_sha: Option<String>,
    /// Job source (GitLab ≥ 18.9).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub job_source: Option<String>,
    /// Direct group memberships, only behind a GitLab feature flag.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub groups_direct: Option<Vec<String>>,
}

/// The claim type a policy binding must use.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ClaimType {
    /// Free-form string (globs allowed in bindings).
    Str,
    /// A GitLab id: exact values only, written as a string or an integer.
    Id,
    /// A boolean (`true`/`false` in policy files, strings in the token).
    Bool,
    /// An integer.
    Int,
    /// A list of strings; a binding matches when any element matches.
    StrList,
}

/// A claim value borrowed from [`GitLabClaims`].
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum ClaimValue<'a> {
    /// A string claim.
    Str(&'a str),
    /// An id claim.
    Id(GitLabId),
    /// A boolean claim.
    Bool(bool),
    /// An integer claim.
    Int(i64),
    /// A list of strings.
    StrList(&'a [String]),
    /// The claim is not in this token.
    Absent,
}

macro_rules! claim_names {
    ($( $variant:ident = $name:literal : $ty:ident, immutable = $imm:literal ;)*) => {
        /// The discrete claims a policy may bind, by their GitLab names.
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
        pub enum ClaimName { $(
            #[doc = concat!("`", $name, "`")]
            $variant,
        )* }

        impl ClaimName {
            /// Every bindable claim.
            pub const ALL: &'static [ClaimName] = &[$(ClaimName::$variant),*];

            /// Looks a claim up by its GitLab name.
            pub fn parse(s: &str) -> Option<Self> {
                match s { $($name => Some(ClaimName::$variant),)* _ => None }
            }
            /// The GitLab claim name.
            pub fn as_str(self) -> &'static str {
                match self { $(ClaimName::$variant => $name,)* }
            }
            /// The type a binding on this claim must have.
            pub fn claim_type(self) -> ClaimType {
                match self { $(ClaimName::$variant => ClaimType::$ty,)* }
            }
            /// Immutable ids: a policy must bind at least one of them.
            pub fn is_immutable_id(self) -> bool {
                match self { $(ClaimName::$variant => $imm,)* }
            }
        }
    };
}

claim_names! {
    ProjectId = "project_id": Id, immutable = true;
    ProjectPath = "project_path": Str, immutable = false;
    NamespaceId = "namespace_id": Id, immutable = true;
    NamespacePath = "namespace_path": Str, immutable = false;
    JobProjectId = "job_project_id": Id, immutable = true;
    JobProjectPath = "job_project_path": Str, immutable = false;
    JobNamespaceId = "job_namespace_id": Id, immutable = false;
    JobNamespacePath = "job_namespace_path": Str, immutable = false;
    UserId = "user_id": Str, immutable = false;
    UserLogin = "user_login": Str, immutable = false;
    UserAccessLevel = "user_access_level": Str, immutable = false;
    PipelineSource = "pipeline_source": Str, immutable = false;
    Ref = "ref": Str, immutable = false;
    RefType = "ref_type": Str, immutable = false;
    RefPath = "ref_path": Str, immutable = false;
    RefProtected = "ref_protected": Bool, immutable = false;
    Environment = "environment": Str, immutable = false;
    EnvironmentProtected = "environment_protected": Bool, immutable = false;
    DeploymentTier = "deployment_tier": Str, immutable = false;
    EnvironmentAction = "environment_action": Str, immutable = false;
    RunnerId = "runner_id": Int, immutable = false;
    RunnerEnvironment = "runner_environment": Str, immutable = false;
    ProjectVisibility = "project_visibility": Str, immutable = false;
    CiConfigRefUri = "ci_config_ref_uri": Str, immutable = false;
    CiConfigSha = "ci_config_sha": Str, immutable = false;
    JobSource = "job_source": Str, immutable = false;
    Sha = "sha": Str, immutable = false;
    GroupsDirect = "groups_direct": StrList, immutable = false;
}

impl fmt::Display for ClaimName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl GitLabClaims {
    /// Reads one bindable claim.
    pub fn claim(&self, name: ClaimName) -> ClaimValue<'_> {
        use ClaimValue::*;
        fn opt_str(v: &Option<String>) -> ClaimValue<'_> {
            v.as_deref().map_or(Absent, Str)
        }
        fn opt_id(v: Option<GitLabId>) -> ClaimValue<'static> {
            v.map_or(Absent, Id)
        }
        match name {
            ClaimName::ProjectId => Id(self.project_id),
            ClaimName::ProjectPath => Str(&self.project_path),
            ClaimName::NamespaceId => Id(self.namespace_id),
            ClaimName::NamespacePath => Str(&self.namespace_path),
            ClaimName::JobProjectId => opt_id(self.job_project_id),
            ClaimName::JobProjectPath => opt_str(&self.job_project_path),
            ClaimName::JobNamespaceId => opt_id(self.job_namespace_id),
            ClaimName::JobNamespacePath => opt_str(&self.job_namespace_path),
            ClaimName::UserId => opt_str(&self.user_id),
            ClaimName::UserLogin => opt_str(&self.user_login),
            ClaimName::UserAccessLevel => opt_str(&self.user_access_level),
            ClaimName::PipelineSource => Str(&self.pipeline_source),
            ClaimName::Ref => Str(&self.git_ref),
            ClaimName::RefType => Str(self.ref_type.as_str()),
            ClaimName::RefPath => opt_str(&self.ref_path),
            ClaimName::RefProtected => Bool(self.ref_protected.0),
            ClaimName::Environment => opt_str(&self.environment),
            ClaimName::EnvironmentProtected => {
                self.environment_protected.map_or(Absent, |b| Bool(b.0))
            }
            ClaimName::DeploymentTier => opt_str(&self.deployment_tier),
            ClaimName::EnvironmentAction => opt_str(&self.environment_action),
            ClaimName::RunnerId => self.runner_id.map_or(Absent, Int),
            ClaimName::RunnerEnvironment => opt_str(&self.runner_environment),
            ClaimName::ProjectVisibility => opt_str(&self.project_visibility),
            ClaimName::CiConfigRefUri => opt_str(&self.ci_config_ref_uri),
            ClaimName::CiConfigSha => opt_str(&self.ci_config_sha),
            ClaimName::JobSource => opt_str(&self.job_source),
            ClaimName::Sha => Str(&self.sha),
            ClaimName::GroupsDirect => self.groups_direct.as_deref().map_or(Absent, StrList),
        }
    }

    /// The project the job runs in: `job_project_id` when GitLab sends it,
    /// else `project_id` (older GitLab, where the two never differ outside
    /// fork merge requests).
    pub fn effective_project_id(&self) -> GitLabId {
        self.job_project_id.unwrap_or(self.project_id)
    }

    /// Whether this looks like a merge-request pipeline from a fork: the
    /// project the token names differs from the project the job runs in.
    /// When GitLab does not send `job_project_id`, a merge-request pipeline
    /// cannot be proven not to be a fork and counts as one.
    pub fn is_possible_fork_pipeline(&self) -> bool {
        match self.job_project_id {
            Some(job) => job != self.project_id,
            None => self.pipeline_source == "merge_request_event",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> serde_json::Value {
        serde_json::from_str(include_str!("../../tests/fixtures/gitlab_payload.json")).unwrap()
    }

    #[test]
    fn the_sample_gitlab_payload_parses_into_typed_fields() {
        let c: GitLabClaims = serde_json::from_value(sample()).unwrap();
        assert_eq!(c.project_id, GitLabId(20));
        assert_eq!(c.runner_id, Some(1));
        assert!(c.ref_protected.0);
        assert_eq!(c.ref_type, RefType::Branch);
        assert_eq!(c.claim(ClaimName::Ref), ClaimValue::Str("main"));
        assert!(!c.is_possible_fork_pipeline());
    }

    #[test]
    fn an_integer_project_id_is_a_type_error_not_absent() {
        let mut v = sample();
        v["project_id"] = serde_json::json!(20);
        assert!(serde_json::from_value::<GitLabClaims>(v).is_err());
    }

    #[test]
    fn a_json_boolean_ref_protected_is_a_type_error() {
        let mut v = sample();
        v["ref_protected"] = serde_json::json!(true);
        assert!(serde_json::from_value::<GitLabClaims>(v).is_err());
    }

    #[test]
    fn a_string_runner_id_is_a_type_error() {
        let mut v = sample();
        v["runner_id"] = serde_json::json!("1");
        assert!(serde_json::from_value::<GitLabClaims>(v).is_err());
    }

    #[test]
    fn numeric_dates_of_the_wrong_type_are_rejected() {
        for bad in [
            serde_json::json!("9999999999"),
            serde_json::json!(1.7e9),
            serde_json::json!(1e300),
            serde_json::json!(null),
            serde_json::json!(true),
            serde_json::json!([1]),
        ] {
            let mut v = sample();
            v["exp"] = bad.clone();
            assert!(serde_json::from_value::<GitLabClaims>(v).is_err(), "{bad}");
        }
    }

    #[test]
    fn aud_is_accepted_as_string_or_array_and_refused_when_empty_or_an_object() {
        let mut v = sample();
        v["aud"] = serde_json::json!(["a", "b"]);
        let c: GitLabClaims = serde_json::from_value(v.clone()).unwrap();
        assert!(c.aud.contains("b"));
        for bad in [
            serde_json::json!([]),
            serde_json::json!(""),
            serde_json::json!({"a": 1}),
        ] {
            v["aud"] = bad;
            assert!(serde_json::from_value::<GitLabClaims>(v.clone()).is_err());
        }
    }

    #[test]
    fn duplicate_members_are_rejected() {
        let text = include_str!("../../tests/fixtures/gitlab_payload.json").replacen(
            "\"sub\":",
            "\"sub\": \"x\", \"sub\":",
            1,
        );
        assert!(serde_json::from_str::<GitLabClaims>(&text).is_err());
    }

    #[test]
    fn ids_with_signs_spaces_or_leading_zeros_are_rejected() {
        for bad in ["", "-1", " 1", "01", "1.0", "1e3", "123456789012345678901"] {
            assert_eq!(GitLabId::parse(bad), None, "{bad}");
        }
        assert_eq!(GitLabId::parse("0"), Some(GitLabId(0)));
    }

    #[test]
    fn serialized_claims_parse_back_into_the_same_claims() {
        let mut v = sample();
        v["environment_protected"] = serde_json::json!("false");
        v["aud"] = serde_json::json!("single");
        let c: GitLabClaims = serde_json::from_value(v).unwrap();
        let json = serde_json::to_value(&c).unwrap();
        assert_eq!(json["project_id"], "20");
        assert_eq!(json["ref_protected"], "true");
        assert_eq!(json["environment_protected"], "false");
        assert_eq!(json["ref_type"], "branch");
        let back: GitLabClaims = serde_json::from_value(json.clone()).unwrap();
        assert_eq!(serde_json::to_value(&back).unwrap(), json);
        assert_eq!(back.project_id, c.project_id);
        assert_eq!(back.aud, c.aud);
        assert_eq!(back.exp, c.exp);
    }

    #[test]
    fn a_differing_job_project_marks_a_fork_pipeline() {
        let mut v = sample();
        v["job_project_id"] = serde_json::json!("21");
        let c: GitLabClaims = serde_json::from_value(v).unwrap();
        assert!(c.is_possible_fork_pipeline());
        assert_eq!(c.effective_project_id(), GitLabId(21));
    }
}
