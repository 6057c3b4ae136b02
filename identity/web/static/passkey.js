// CityPlane passkeys, the browser side (server side: identity/trust/passkey.py).
//
// No framework, no build step, no inline script: a page includes
//   <script src="/static/passkey.js" defer></script>
// and marks its controls; a Content-Security-Policy of `script-src 'self'` is enough.
//   <button type="button" data-passkey="register"            (or data-passkey="login")
//           data-options-url="/passkeys/register/options"
//           data-verify-url="/passkeys/register"
//           data-redirect="/account">Add a passkey</button>  (data-redirect: optional fallback)
//   <p data-passkey-status role="status" aria-live="polite"></p>
//
// Server contract, both ceremonies (JSON over same-origin fetch, cookies included):
//   POST options-url, body {}            -> 200, the options JSON from registration_options /
//                                           authentication_options
//   POST verify-url, body credential JSON -> 200 JSON; {"redirect": url} navigates there,
//                                           {"message": text} is shown in the status element
//   any error                             -> application/problem+json; `detail` (else `title`)
//                                           is shown in the status element
// CSRF: a <meta name="csrf-token" content="..."> is sent back as the X-CSRF-Token header.
// Messages of the browser's own failures can be replaced (e.g. translated) with attributes on
// the status element: data-msg-unsupported, data-msg-cancelled, data-msg-exists, data-msg-failed.
// The button gets a "passkey:done" or "passkey:error" event (detail: server JSON / message).
"use strict";

(function () {
  const MESSAGES = {
    unsupported: "This browser does not support passkeys.",
    cancelled: "The passkey request was cancelled or timed out.",
    exists: "This authenticator already holds a passkey for this account.",
    failed: "The passkey could not be used. Please try again.",
  };

  // RFC 4648 §5 base64url without padding, as WebAuthn's JSON forms use (L3 §5.1.8).
  function toBase64url(buffer) {
    const bytes = new Uint8Array(buffer);
    let binary = "";
    for (let i = 0; i < bytes.length; i += 1) binary += String.fromCharCode(bytes[i]);
    return btoa(binary).replace(/\+/g, "-").replace(/\//g, "_").replace(/=+$/, "");
  }

  function fromBase64url(text) {
    const base64 = text.replace(/-/g, "+").replace(/_/g, "/");
    const padded = base64 + "=".repeat((4 - (base64.length % 4)) % 4);
    const binary = atob(padded);
    const bytes = new Uint8Array(binary.length);
    for (let i = 0; i < binary.length; i += 1) bytes[i] = binary.charCodeAt(i);
    return bytes.buffer;
  }

  function descriptors(list) {
    return (list || []).map((d) => Object.assign({}, d, { id: fromBase64url(d.id) }));
  }

  function creationOptions(json) {
    return Object.assign({}, json, {
      challenge: fromBase64url(json.challenge),
      user: Object.assign({}, json.user, { id: fromBase64url(json.user.id) }),
      excludeCredentials: descriptors(json.excludeCredentials),
    });
  }

  function requestOptions(json) {
    return Object.assign({}, json, {
      challenge: fromBase64url(json.challenge),
      allowCredentials: descriptors(json.allowCredentials),
    });
  }

  // RegistrationResponseJSON / AuthenticationResponseJSON (L3 §5.1), which the server parses.
  function credentialJSON(credential) {
    const r = credential.response;
    const response = { clientDataJSON: toBase64url(r.clientDataJSON) };
    if (r.attestationObject) {
      response.attestationObject = toBase64url(r.attestationObject);
      response.transports = typeof r.getTransports === "function" ? r.getTransports() : [];
    } else {
      response.authenticatorData = toBase64url(r.authenticatorData);
      response.signature = toBase64url(r.signature);
      response.userHandle = r.userHandle ? toBase64url(r.userHandle) : null;
    }
    return {
      id: credential.id,
      rawId: toBase64url(credential.rawId),
      type: credential.type,
      authenticatorAttachment: credential.authenticatorAttachment || null,
      clientExtensionResults: credential.getClientExtensionResults(),
      response: response,
    };
  }

  class PasskeyFailure extends Error {}

  async function post(url, body) {
    const headers = { "Content-Type": "application/json", Accept: "application/json" };
    const csrf = document.querySelector('meta[name="csrf-token"]');
    if (csrf) headers["X-CSRF-Token"] = csrf.getAttribute("content");
    const answer = await fetch(url, {
      method: "POST",
      credentials: "same-origin",
      headers: headers,
      body: JSON.stringify(body),
    });
    let data = {};
    try {
      data = await answer.json();
    } catch (_) {
      data = {};
    }
    if (!answer.ok) {
      throw new PasskeyFailure(data.detail || data.title || MESSAGES.failed);
    }
    return data;
  }

  function browserFailure(error, messages) {
    if (error instanceof PasskeyFailure) return error;
    // DOMException names from WebAuthn L3 §5.1.3 / §5.1.4.
    if (error && error.name === "NotAllowedError") return new PasskeyFailure(messages.cancelled);
    if (error && error.name === "InvalidStateError") return new PasskeyFailure(messages.exists);
    return new PasskeyFailure(messages.failed);
  }

  function supported() {
    return Boolean(window.PublicKeyCredential && navigator.credentials);
  }

  async function register(optionsUrl, verifyUrl, messages) {
    const m = Object.assign({}, MESSAGES, messages || {});
    if (!supported()) throw new PasskeyFailure(m.unsupported);
    try {
      const options = await post(optionsUrl, {});
      const credential = await navigator.credentials.create({ publicKey: creationOptions(options) });
      return await post(verifyUrl, credentialJSON(credential));
    } catch (error) {
      throw browserFailure(error, m);
    }
  }

  async function login(optionsUrl, verifyUrl, messages) {
    const m = Object.assign({}, MESSAGES, messages || {});
    if (!supported()) throw new PasskeyFailure(m.unsupported);
    try {
      const options = await post(optionsUrl, {});
      const credential = await navigator.credentials.get({ publicKey: requestOptions(options) });
      return await post(verifyUrl, credentialJSON(credential));
    } catch (error) {
      throw browserFailure(error, m);
    }
  }

  function statusMessages(status) {
    if (!status) return {};
    const out = {};
    for (const key of Object.keys(MESSAGES)) {
      const value = status.getAttribute("data-msg-" + key);
      if (value) out[key] = value;
    }
    return out;
  }

  async function run(button) {
    const status = document.querySelector("[data-passkey-status]");
    const ceremony = button.getAttribute("data-passkey") === "register" ? register : login;
    button.disabled = true;
    if (status) status.textContent = "";
    try {
      const result = await ceremony(
        button.getAttribute("data-options-url"),
        button.getAttribute("data-verify-url"),
        statusMessages(status),
      );
      if (status && result.message) status.textContent = result.message;
      button.dispatchEvent(new CustomEvent("passkey:done", { detail: result, bubbles: true }));
      const target = result.redirect || button.getAttribute("data-redirect");
      if (target) window.location.assign(target);
    } catch (error) {
      if (status) status.textContent = error.message;
      button.dispatchEvent(new CustomEvent("passkey:error", { detail: error.message, bubbles: true }));
    } finally {
      button.disabled = false;
    }
  }

  document.addEventListener("click", (event) => {
    const button = event.target.closest && event.target.closest("[data-passkey]");
    if (!button) return;
    event.preventDefault();
    run(button);
  });

  window.CityPlanePasskey = { supported, register, login, toBase64url, fromBase64url };
})();
