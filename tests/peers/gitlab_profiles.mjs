// GitLab CI ID token claim sets ("profiles") shared by the test issuers.
//
// Shapes and JSON types follow GitLab's JwtV2 (see shared reference gitlab.md
// §1.4/§1.6): every id is a string except `runner_id` (integer); booleans are
// the strings "true"/"false"; `sub` is project_path:…:ref_type:…:ref:…
// (built from the *source* project, which differs from the job's project in
// fork merge-request pipelines).

import { randomUUID } from 'node:crypto';

/** Claims every profile starts from: project 42 `grp/proj`, protected `main`. */
const BASE = Object.freeze({
  project_id: '42',
  project_path: 'grp/proj',
  namespace_id: '7',
  namespace_path: 'grp',
  job_project_id: '42',
  job_project_path: 'grp/proj',
  job_namespace_id: '7',
  job_namespace_path: 'grp',
  user_id: '1',
  user_login: 'sample-user',
  user_email: 'sample-user@example.com',
  user_access_level: 'maintainer',
  pipeline_id: '574',
  pipeline_source: 'push',
  job_id: '302',
  ref: 'main',
  ref_type: 'branch',
  ref_path: 'refs/heads/main',
  ref_protected: 'true',
  runner_id: 1,
  runner_environment: 'self-hosted',
  sha: '714a629c0b401fdce83e847fc9589983fc6f46bc',
  project_visibility: 'private',
  ci_config_ref_uri: 'gitlab.example.com/grp/proj//.gitlab-ci.yml@refs/heads/main',
  ci_config_sha: '714a629c0b401fdce83e847fc9589983fc6f46bc',
  job_source: 'push',
});

/** Overrides applied to BASE, by profile name (= oidc-provider client_id). */
const OVERRIDES = {
  // Project 42, protected main, no environment.
  main: {},
  // Same project, deploying main to the protected `production` environment.
  'env-prod': {
    environment: 'production',
    environment_protected: 'true',
    deployment_tier: 'production',
    environment_action: 'start',
  },
  // Same project, an unprotected feature branch.
  feature: {
    ref: 'feature/x',
    ref_path: 'refs/heads/feature/x',
    ref_protected: 'false',
    user_id: '5',
    user_login: 'dev',
    user_email: 'dev@example.com',
    user_access_level: 'developer',
    ci_config_ref_uri: 'gitlab.example.com/grp/proj//.gitlab-ci.yml@refs/heads/feature/x',
  },
  // A protected tag of the same project.
  tag: {
    ref: 'v1.2.3',
    ref_type: 'tag',
    ref_path: 'refs/tags/v1.2.3',
    ci_config_ref_uri: 'gitlab.example.com/grp/proj//.gitlab-ci.yml@refs/tags/v1.2.3',
  },
  // A merge request from the fork `contrib/proj` (project 99) running in
  // project 42: project_* name the fork, job_project_* the project the job
  // runs in, and the config does not come from the source project.
  fork: {
    project_id: '99',
    project_path: 'contrib/proj',
    namespace_id: '11',
    namespace_path: 'contrib',
    pipeline_source: 'merge_request_event',
    job_source: 'merge_request_event',
    ref: 'patch-1',
    ref_path: 'refs/heads/patch-1',
    ref_protected: 'false',
    user_id: '9',
    user_login: 'outsider',
    user_email: 'outsider@example.com',
    user_access_level: null,
    project_visibility: 'public',
    ci_config_ref_uri: null,
    ci_config_sha: null,
  },
  // A different namespace altogether: project 77 `other/proj`, protected main.
  'other-ns': {
    project_id: '77',
    project_path: 'other/proj',
    namespace_id: '8',
    namespace_path: 'other',
    job_project_id: '77',
    job_project_path: 'other/proj',
    job_namespace_id: '8',
    job_namespace_path: 'other',
    ci_config_ref_uri: 'gitlab.example.com/other/proj//.gitlab-ci.yml@refs/heads/main',
  },
};

/** Names of the known profiles. */
export const PROFILES = Object.freeze(Object.keys(OVERRIDES));

/** GitLab's default `sub`: project_path:{source project}:ref_type:{t}:ref:{r}. */
export function gitlabSub(c) {
  return `project_path:${c.project_path}:ref_type:${c.ref_type}:ref:${c.ref}`;
}

/**
 * The custom (non-registered) claims of a profile, with `sub` computed from
 * them. Throws on an unknown profile name.
 */
export function profileClaims(name) {
  if (!Object.hasOwn(OVERRIDES, name)) {
    throw new Error(`unknown profile ${JSON.stringify(name)}; known: ${PROFILES.join(', ')}`);
  }
  const claims = { ...BASE, ...OVERRIDES[name] };
  return { ...claims, sub: gitlabSub(claims) };
}

/**
 * Applies overrides to a claim set: a `null` value deletes the claim, any
 * other value replaces it. Returns a new object.
 */
export function applyOverrides(claims, overrides) {
  const out = { ...claims };
  for (const [k, v] of Object.entries(overrides ?? {})) {
    if (v === null) delete out[k];
    else out[k] = v;
  }
  return out;
}

/** A GitLab-style jti: a random UUID v4. */
export function newJti() {
  return randomUUID();
}

/**
 * Checks a decoded payload has GitLab's JSON types; returns a list of
 * problems (empty when fine). Used by the issuers' self-tests.
 */
export function gitlabTypeProblems(p) {
  const problems = [];
  const strings = [
    'project_id', 'project_path', 'namespace_id', 'namespace_path', 'job_project_id',
    'job_project_path', 'job_namespace_id', 'job_namespace_path', 'user_id', 'user_login',
    'user_email', 'pipeline_id', 'pipeline_source', 'job_id', 'ref', 'ref_type', 'ref_path',
    'ref_protected', 'runner_environment', 'sha', 'project_visibility', 'job_source', 'jti',
    'iss', 'sub',
  ];
  for (const k of strings) {
    if (typeof p[k] !== 'string') problems.push(`${k} is not a string`);
  }
  if (!Number.isInteger(p.runner_id)) problems.push('runner_id is not an integer');
  for (const k of ['ref_protected', 'environment_protected']) {
    if (k in p && p[k] !== 'true' && p[k] !== 'false') problems.push(`${k} is not "true"/"false"`);
  }
  for (const k of ['iat', 'nbf', 'exp']) {
    if (!Number.isInteger(p[k])) problems.push(`${k} is not an integer`);
  }
  if (p.nbf !== p.iat - 5) problems.push('nbf is not iat - 5');
  if (!(typeof p.aud === 'string' || Array.isArray(p.aud))) problems.push('aud is neither string nor array');
  if ('client_id' in p || 'scope' in p) problems.push('client_id/scope leaked from the provider');
  return problems;
}
