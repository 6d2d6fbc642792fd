// Signing in: paste a token once (kept in this tab's session storage), or sign in with the
// server's OIDC issuer (authorization code with PKCE; the ID token is the bearer token).

import { useEffect, useState, type FormEvent } from "react";
import { loginConfig, request, setToken } from "../api/client";

const PENDING = "flotilla.oidc";

function base64url(bytes: ArrayBuffer | Uint8Array): string {
  const b = bytes instanceof Uint8Array ? bytes : new Uint8Array(bytes);
  return btoa(String.fromCharCode(...b)).replace(/\+/g, "-").replace(/\//g, "_").replace(/=+$/, "");
}

function random(): string {
  return base64url(crypto.getRandomValues(new Uint8Array(32)));
}

async function discovery(issuer: string) {
  const resp = await fetch(`${issuer.replace(/\/$/, "")}/.well-known/openid-configuration`);
  if (!resp.ok) throw new Error(`the issuer ${issuer} did not answer its discovery document (${resp.status})`);
  return resp.json();
}

function redirectUri(): string {
  return `${location.origin}/ui/callback`;
}

async function startOidcLogin(issuer: string, clientID: string) {
  const config = await discovery(issuer);
  const verifier = random();
  const state = random();
  const nonce = random();
  const challenge = base64url(await crypto.subtle.digest("SHA-256", new TextEncoder().encode(verifier)));
  sessionStorage.setItem(PENDING, JSON.stringify({ issuer, clientID, verifier, state, nonce }));
  const query = new URLSearchParams({
    response_type: "code",
    client_id: clientID,
    redirect_uri: redirectUri(),
    scope: "openid email profile groups",
    code_challenge: challenge,
    code_challenge_method: "S256",
    state,
    nonce,
  });
  location.assign(`${config.authorization_endpoint}?${query}`);
}

/** The issuer sent the browser back to /ui/callback: trade the code for the ID token. */
export async function finishOidcLogin() {
  const pending = JSON.parse(sessionStorage.getItem(PENDING) ?? "null");
  sessionStorage.removeItem(PENDING);
  const params = new URLSearchParams(location.search);
  if (!pending) throw new Error("This sign-in was not started here; start again.");
  if (params.get("error")) throw new Error(`The issuer refused: ${params.get("error_description") ?? params.get("error")}`);
  if (params.get("state") !== pending.state) throw new Error("The sign-in answer does not match the request (state); start again.");
  const config = await discovery(pending.issuer);
  const resp = await fetch(config.token_endpoint, {
    method: "POST",
    headers: { "Content-Type": "application/x-www-form-urlencoded" },
    body: new URLSearchParams({
      grant_type: "authorization_code",
      code: params.get("code") ?? "",
      redirect_uri: redirectUri(),
      client_id: pending.clientID,
      code_verifier: pending.verifier,
    }),
  });
  const answer = await resp.json();
  if (!resp.ok || !answer.id_token) throw new Error(`The issuer gave no ID token: ${answer.error_description ?? answer.error ?? resp.status}`);
  const claims = JSON.parse(atob(answer.id_token.split(".")[1].replace(/-/g, "+").replace(/_/g, "/")));
  if (claims.nonce !== pending.nonce) throw new Error("The ID token is not for this sign-in (nonce); start again.");
  setToken(answer.id_token);
}

export function Login({ onSignedIn }: { onSignedIn: () => void }) {
  const [value, setValue] = useState("");
  const [error, setError] = useState<string | null>(null);
  const [oidc, setOidc] = useState<{ issuer: string; clientID: string } | null>(null);
  useEffect(() => {
    loginConfig().then(setOidc).catch(() => setOidc(null));
  }, []);
  const submit = async (e: FormEvent) => {
    e.preventDefault();
    setToken(value.trim());
    try {
      // Any request that needs a token says whether this one works.
      await request("GET", "/apis/flotilla.dev/v1alpha1/projects");
      onSignedIn();
    } catch (err: any) {
      setToken(null);
      setError(err.code === 401 ? "This token is not valid (or has expired)." : err.message);
    }
  };
  return (
    <div className="login">
      <h1>Flotilla</h1>
      {oidc && (
        <button type="button" className="primary" onClick={() => startOidcLogin(oidc.issuer, oidc.clientID).catch((e) => setError(e.message))}>
          Sign in with {new URL(oidc.issuer).host}
        </button>
      )}
      <form onSubmit={submit}>
        <label>
          Token
          <input
            type="password"
            name="token"
            autoComplete="off"
            value={value}
            onChange={(e) => setValue(e.target.value)}
            placeholder="flt.… (admin.yaml, or flotilla token create)"
          />
        </label>
        <button type="submit" className={oidc ? "" : "primary"} disabled={!value.trim()}>
          Sign in with a token
        </button>
      </form>
      {error && (
        <div className="error" role="alert">
          {error}
        </div>
      )}
    </div>
  );
}
