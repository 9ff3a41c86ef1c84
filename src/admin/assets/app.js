// The Switchyard dashboard: polls /dashboard.json every second and draws it. Hand-written,
// no dependencies. Every value from the gateway is set as text (route names and errors
// come from Consul KV, which is not trusted to hold HTML).
'use strict';

(function () {
  const POLL_MS = 1000;
  const TOKEN_KEY = 'switchyard-admin-token';
  const $ = (id) => document.getElementById(id);

  let token = sessionStorage.getItem(TOKEN_KEY) || '';
  let last = null;
  let timer = null;
  let failures = 0;

  // Errors of the page itself are shown, not hidden in the console.
  const pageErrors = [];
  function pageError(message) {
    pageErrors.push(String(message));
    showAlarm('Dashboard error: ' + message, 'bad');
  }
  window.addEventListener('error', (e) => pageError(e.message));
  window.addEventListener('unhandledrejection', (e) => pageError(e.reason && e.reason.message ? e.reason.message : e.reason));

  // el('td', {class: 'num', title: 'x'}, child, 'text', ...): children are nodes or text.
  function el(tag, attrs, ...children) {
    const node = document.createElement(tag);
    for (const [k, v] of Object.entries(attrs || {})) {
      if (v === undefined || v === null || v === false) continue;
      if (k === 'class') node.className = v;
      else if (k.startsWith('data-')) node.setAttribute(k, String(v));
      else node[k] = v;
    }
    for (const c of children) {
      if (c === undefined || c === null || c === false) continue;
      node.append(c instanceof Node ? c : document.createTextNode(String(c)));
    }
    return node;
  }
  const sub = (text, cls) => el('span', { class: 'sub' + (cls ? ' ' + cls : '') }, text);
  const tag = (text) => el('span', { class: 'tag' }, text);
  const pill = (text, cls) => el('span', { class: 'pill ' + (cls || '') }, text);

  function age(s) {
    if (s === null || s === undefined) return '—';
    if (s < 1) return (s * 1000).toFixed(0) + ' ms';
    if (s < 60) return s.toFixed(s < 10 ? 1 : 0) + ' s';
    if (s < 3600) return Math.floor(s / 60) + ' m ' + Math.floor(s % 60) + ' s';
    return Math.floor(s / 3600) + ' h ' + Math.floor((s % 3600) / 60) + ' m';
  }
  const ms = (v) => (v === null || v === undefined ? '—' : v < 10 ? v.toFixed(2) + ' ms' : v < 1000 ? v.toFixed(0) + ' ms' : (v / 1000).toFixed(2) + ' s');
  const rate = (v) => (v >= 100 ? v.toFixed(0) : v >= 1 ? v.toFixed(1) : v > 0 ? v.toFixed(2) : '0');
  function pct(n, total) {
    if (!total) return '—';
    const p = (100 * n) / total;
    return p === 0 ? '0%' : p < 0.1 ? '<0.1%' : p.toFixed(p < 10 ? 1 : 0) + '%';
  }

  function showAlarm(text, cls) {
    const a = $('alarm');
    a.textContent = text;
    a.className = 'alarm ' + (cls === 'warn' ? 'warn' : '');
    a.hidden = false;
  }
  function hideAlarm() {
    if (pageErrors.length) return;
    $('alarm').hidden = true;
  }

  function setLive(ok, text) {
    const l = $('live');
    l.textContent = text;
    l.className = 'pill ' + (ok ? 'good' : 'bad');
  }

  function showLogin(message) {
    $('main').hidden = true;
    $('login').hidden = false;
    $('login-error').textContent = message || '';
    setLive(false, 'locked');
    $('token').focus();
  }

  $('login').addEventListener('submit', (e) => {
    e.preventDefault();
    token = $('token').value.trim();
    sessionStorage.setItem(TOKEN_KEY, token);
    $('token').value = '';
    poll();
  });
  $('search').addEventListener('input', () => last && renderRoutes(last));
  $('span').addEventListener('change', () => poll());

  async function poll() {
    clearTimeout(timer);
    const headers = token ? { Authorization: 'Bearer ' + token } : {};
    try {
      const series = $('span').value === '10m' ? '10s' : '1s';
      const resp = await fetch('dashboard.json?series=' + series, { headers, cache: 'no-store' });
      if (resp.status === 401) {
        showLogin(token ? 'The gateway refused this token.' : '');
        return; // Polling resumes when a token is entered.
      }
      if (!resp.ok) throw new Error('the gateway answered ' + resp.status);
      const data = await resp.json();
      failures = 0;
      $('login').hidden = true;
      $('main').hidden = false;
      last = data;
      render(data);
    } catch (e) {
      failures += 1;
      setLive(false, 'offline');
      showAlarm('Lost contact with the gateway (' + (e.message || e) + '); showing what it said last.', 'bad');
    }
    timer = setTimeout(poll, failures ? Math.min(POLL_MS * 2 ** failures, 10000) : POLL_MS);
  }

  function render(d) {
    $('version').textContent = 'v' + d.gateway.version;
    setLive(true, 'live · ' + new Date(d.generated_at_unix_ms).toLocaleTimeString());
    renderConsul(d);
    renderRoutes(d);
    renderRejected(d);
    renderConflicts(d);
    renderServices(d);
  }

  function renderConsul(d) {
    const c = d.consul;
    const agents = c.agents;
    $('c-agent').textContent = (agents ? agents.active : c.address).replace(/^https?:\/\//, '');
    $('c-agents').textContent = agents && agents.addresses.length > 1
      ? agents.addresses.length + ' agents configured · active for ' + age(agents.active_for_s)
      : (agents ? 'active for ' + age(agents.active_for_s) : '');
    const failing = c.watches.filter((w) => w.consecutive_errors > 0);
    // A healthy blocking query may wait minutes for a change: "live" says more than its age.
    const live = c.last_contact_s !== null && !failing.length;
    $('c-contact').textContent = live ? 'live' : c.last_contact_s === null ? 'never' : age(c.last_contact_s) + ' ago';
    $('c-contact').className = 'big ' + (live ? 'good' : 'bad');
    $('c-watches').textContent = (c.last_contact_s !== null ? 'last answer ' + age(c.last_contact_s) + ' ago · ' : '') +
      c.watches.length + ' watches' + (failing.length ? ' · ' + failing.length + ' failing' : ' · all healthy');
    $('c-age').textContent = c.data_age_s === null ? '—' : age(c.data_age_s);
    $('c-age').className = 'big ' + (c.stale ? 'bad' : c.data_age_s > 0 ? 'warn' : 'good');
    $('c-age-card').classList.toggle('stale', c.stale);
    $('c-age-limit').textContent = 'stale after ' + age(c.stale_after_s);
    $('c-snapshot').textContent = 'v' + d.snapshot.version;
    $('c-changed').textContent = (d.snapshot.published_at_unix_ms
      ? 'changed ' + age((d.generated_at_unix_ms - d.snapshot.published_at_unix_ms) / 1000) + ' ago · '
      : '') + 'from ' + d.snapshot.source.replace('_', ' ');
    $('c-ready').textContent = d.ready.ready ? 'ready' : 'not ready';
    $('c-ready').className = 'big ' + (d.ready.ready ? 'good' : 'bad');
    $('c-reason').textContent = d.ready.reason;

    if (c.stale) {
      const why = failing.length && failing[0].last_error ? ': ' + failing[0].last_error : '';
      showAlarm('Consul data is stale (' + (c.data_age_s === null ? 'never read' : age(c.data_age_s) + ' old') +
        '); serving the last good state' + why, 'bad');
    } else if (c.token && c.token.refused_for_s !== null && c.token.refused_for_s !== undefined) {
      showAlarm('Consul refuses the ACL token (' + (c.token.refused_message || 'forbidden') + ') since ' + age(c.token.refused_for_s), 'warn');
    } else if (failing.length) {
      showAlarm(failing.length + ' Consul watch(es) failing: ' + failing.map((w) => w.name + (w.last_error ? ' (' + w.last_error + ')' : '')).join(', '), 'warn');
    } else {
      hideAlarm();
    }
  }

  function matches(r, q) {
    if (!q) return true;
    const hay = [r.name, r.host || '', r.path_prefix, r.service, (r.methods || []).join(' '),
      (r.split || []).map((s) => s.service).join(' ')].join(' ').toLowerCase();
    return q.split(/\s+/).every((word) => hay.includes(word));
  }

  function renderRoutes(d) {
    const q = $('search').value.trim().toLowerCase();
    const rows = [];
    const shown = d.routes.filter((r) => matches(r, q));
    const rejected = new Set(d.rejected.map((r) => r.name));
    for (const r of shown) {
      const t = r.traffic;
      const m = t ? t.last_minute : null;
      const matchCell = el('td', {},
        el('code', {}, (r.host || '*') + r.path_prefix),
        sub((r.methods.length ? r.methods.join(' ') : 'any method') +
          (r.match_headers.length ? ' · headers: ' + r.match_headers.join(', ') : '')));
      const service = el('td', {}, r.redirect ? 'redirect' : r.service);
      if (r.split) service.append(sub(r.split.map((s) => s.service + (s.tags.length ? '[' + s.tags.join(',') + ']' : '') + ' ' + (s.share_per_mille / 10) + '%').join(' · ')));
      if (r.datacenters) service.append(sub('datacenters: ' + r.datacenters.failover_order.join(' → ')));
      if (!r.redirect) service.append(sub(r.upstreams + ' instance' + (r.upstreams === 1 ? '' : 's') + ' · ' + r.health.replace(/_/g, ' '), r.upstreams ? '' : 'bad'));
      const policies = el('td', {});
      if (r.auth) {
        const kinds = r.auth.jwt.map((p) => 'jwt:' + p).concat(r.auth.api_key ? ['api key'] : []);
        policies.append(tag(kinds.join(' | ')));
        if (r.auth.scopes.length) policies.append(tag('scopes: ' + r.auth.scopes.join(' ')));
      } else {
        policies.append(el('span', { class: 'muted' }, 'public'));
      }
      for (const p of r.policies) policies.append(sub(p));
      const canvas = el('canvas', { class: 'chart', width: 180, height: 34 });
      rows.push(el('tr', { 'data-route': r.name },
        el('td', { class: 'name' }, r.name, sub(r.source), rejected.has(r.name) && sub('newer version rejected', 'bad')),
        matchCell, service, policies,
        el('td', { class: 'num' }, t ? rate(t.requests_per_s) : '0'),
        el('td', { class: 'num' + (m && m.client_errors ? ' warn' : '') }, m ? pct(m.client_errors, m.requests) : '—'),
        el('td', { class: 'num' + (m && m.server_errors ? ' bad' : '') }, m ? pct(m.server_errors, m.requests) : '—'),
        el('td', { class: 'num' + (m && m.gateway_errors ? ' bad' : '') }, m ? pct(m.gateway_errors, m.requests) : '—'),
        el('td', { class: 'num' }, m ? ms(m.p50_ms) : '—'),
        el('td', { class: 'num' }, m ? ms(m.p99_ms) : '—'),
        el('td', {}, canvas)));
      drawChart(canvas, t && t.series ? t.series : null, 60);
    }
    $('routes').tBodies[0].replaceChildren(...rows);
    $('route-count').textContent = q ? shown.length + ' of ' + d.routes.length : String(d.routes.length);
    $('no-routes').hidden = shown.length > 0;
  }

  // Bars of requests per second (errors in red on top of the rest) and the p99 as a line.
  // `series` holds columns, oldest first; `slots` points fit the width.
  function drawChart(canvas, series, slots) {
    const ratio = window.devicePixelRatio || 1;
    const w = canvas.width, h = canvas.height;
    canvas.width = w * ratio;
    canvas.height = h * ratio;
    canvas.style.width = w + 'px';
    canvas.style.height = h + 'px';
    const g = canvas.getContext('2d');
    g.scale(ratio, ratio);
    g.fillStyle = '#f1f3f6';
    g.fillRect(0, 0, w, h);
    const n = series ? Math.min(series.requests.length, slots) : 0;
    if (!n) return;
    const from = series.requests.length - n;
    const perS = (i, count) => (series.span_s[i] > 0 ? count / series.span_s[i] : 0);
    let top = 1;
    for (let i = from; i < from + n; i++) top = Math.max(top, perS(i, series.requests[i]));
    const bw = w / slots;
    const offset = slots - n;
    for (let k = 0; k < n; k++) {
      const i = from + k;
      const x = (offset + k) * bw;
      const all = (perS(i, series.requests[i]) / top) * (h - 2);
      const bad = (perS(i, series.client_errors[i] + series.server_errors[i]) / top) * (h - 2);
      g.fillStyle = '#7aa2e3';
      g.fillRect(x, h - all, Math.max(1, bw - 1), all);
      g.fillStyle = '#cf222e';
      g.fillRect(x, h - bad, Math.max(1, bw - 1), bad);
    }
    const p99s = series.p99_ms.slice(from).map((v) => v || 0);
    const slow = Math.max(...p99s);
    if (slow > 0) {
      g.strokeStyle = '#b26a00';
      g.lineWidth = 1;
      g.beginPath();
      p99s.forEach((v, k) => {
        const x = (offset + k + 0.5) * bw;
        const y = h - 1 - (v / slow) * (h - 4);
        if (k === 0) g.moveTo(x, y); else g.lineTo(x, y);
      });
      g.stroke();
    }
  }

  function renderRejected(d) {
    const rows = d.rejected.map((r) => el('tr', { 'data-rejected': r.name },
      el('td', {}, el('code', {}, r.key)),
      el('td', { class: 'bad' }, r.error),
      el('td', { class: 'num' }, r.modify_index || '—'),
      el('td', {}, r.serving_last_good
        ? 'last good version' + (r.last_good_modify_index ? ' (index ' + r.last_good_modify_index + ')' : '')
        : el('span', { class: 'muted' }, 'nothing (no good version)'))));
    $('rejected').tBodies[0].replaceChildren(...rows);
    $('rejected-section').hidden = rows.length === 0;
  }

  function renderConflicts(d) {
    const rows = d.conflicts.map((c) => el('tr', {}, el('td', {}, c.route), el('td', {}, c.shadowed_by)));
    $('conflicts').tBodies[0].replaceChildren(...rows);
    $('conflicts-section').hidden = rows.length === 0;
  }

  function renderServices(d) {
    const cards = d.services.map((s) => {
      const rows = s.instances.map((i) => {
        const health = i.ejected ? 'ejected' : i.health;
        const why = i.ejected
          ? 'ejected for ' + age(i.ejected_for_ms / 1000) + ' more after ' + (i.consecutive_failures || 0) +
            ' consecutive failures (ejection ' + i.ejections_in_a_row + ' in a row)'
          : i.consecutive_failures ? i.consecutive_failures + ' consecutive failures' : '';
        return el('tr', { 'data-instance': i.id, 'data-health': health },
          el('td', {}, el('code', {}, i.id)),
          el('td', {}, i.address + ':' + i.port),
          el('td', {}, pill(health, health === 'passing' ? 'good' : health === 'warning' ? 'warn' : 'bad')),
          el('td', { class: 'num' }, i.weight),
          el('td', { class: 'num' }, i.in_flight ?? 0),
          el('td', { class: 'num' }, i.requests_total ?? 0),
          el('td', { class: 'num' }, i.failures_total ?? 0),
          el('td', {}, why));
      });
      for (const o of s.out_of_service) {
        rows.push(el('tr', { 'data-instance': o.id, 'data-health': o.health },
          el('td', {}, el('code', {}, o.id)),
          el('td', {}, o.address + ':' + o.port),
          el('td', {}, pill(o.health, 'bad')),
          el('td', { class: 'num' }, '—'), el('td', { class: 'num' }, '—'),
          el('td', { class: 'num' }, '—'), el('td', { class: 'num' }, '—'),
          el('td', {}, 'out of service: ' + o.checks.join(', '))));
      }
      const w = s.watch;
      const watch = w
        ? (w.consecutive_errors ? el('span', { class: 'bad' }, 'watch failing: ' + (w.last_error || '')) : el('span', { class: 'muted' }, 'watch index ' + w.index + ' · data age ' + age(w.data_age_s)))
        : '';
      return el('div', { class: 'service', 'data-service': s.service },
        el('h3', {}, s.service, watch),
        rows.length
          ? el('table', {},
            el('thead', {}, el('tr', {}, ...['Instance', 'Address', 'Health', '#Weight', '#In flight', '#Requests', '#Failures', 'Why']
              .map((h) => (h.startsWith('#') ? el('th', { class: 'num' }, h.slice(1)) : el('th', {}, h))))),
            el('tbody', {}, ...rows))
          : el('p', { class: 'bad' }, 'No instance registered.'));
    });
    $('services').replaceChildren(...cards);
  }

  poll();
})();
