// The gateway's dashboard: renders the JSON APIs for a key holder or an operator. No framework, no build.
"use strict";

import { accountView, wireAccount } from "./account.js";
import { $ } from "./format.js";
import { holderView, wireHolder } from "./holder.js";
import { operatorView, wireOperator } from "./operator.js";

const KEY_PREFIX = "gwk_";
const VIEWS = ["holder", "operator", "account"];

/** Which view the address asks for: an account page (#account=ID) or the key's own overview. */
function route(operator) {
  const account = new URLSearchParams(location.hash.slice(1)).get("account");
  return operator && account ? { view: "account", id: account } : { view: operator ? "operator" : "holder" };
}

async function open() {
  const key = sessionStorage.getItem("gateway-key");
  for (const v of VIEWS) $(v).hidden = true;
  $("logout").hidden = !key;
  $("login").hidden = !!key;
  document.body.dataset.ready = "";
  if (!key) {
    $("status").textContent = "Enter an API key (gwk_…) to see your credits and usage, or the admin key.";
    return;
  }
  const operator = !key.startsWith(KEY_PREFIX);
  const where = route(operator);
  $("status").textContent = "Loading…";
  try {
    if (where.view === "account") await accountView(where.id);
    else await (operator ? operatorView() : holderView());
    $(where.view).hidden = false;
    $("status").textContent = "";
    $("whoami").textContent = operator ? "Operator" : "Your account";
    document.body.dataset.ready = where.view;
    window.dispatchEvent(new Event("resize"));  // charts size themselves to their now visible container
  } catch (error) {
    $("status").textContent = "Could not load the dashboard: " + error.message;
    document.body.dataset.ready = "error";
  }
}

document.addEventListener("DOMContentLoaded", () => {
  const fragment = new URLSearchParams(location.hash.slice(1));
  if (fragment.get("key")) {
    sessionStorage.setItem("gateway-key", fragment.get("key"));
    fragment.delete("key");
    const rest = fragment.toString();  // the key leaves the address bar at once; a page (#account=…) stays
    history.replaceState(null, "", location.pathname + (rest ? "#" + rest : ""));
  }
  $("login").addEventListener("submit", (event) => {
    event.preventDefault();
    sessionStorage.setItem("gateway-key", $("key").value.trim());
    $("key").value = "";
    open();
  });
  $("logout").addEventListener("click", () => {
    sessionStorage.removeItem("gateway-key");
    history.replaceState(null, "", location.pathname);
    open();
    $("status").textContent = "Signed out.";
  });
  window.addEventListener("hashchange", open);
  wireHolder();
  wireOperator();
  wireAccount();
  open();
});
