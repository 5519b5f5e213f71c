// Narrow windows (<= 900 px wide): the sidebar is for navigating, the page gets the width.
// Streamlit's "auto" sidebar collapses only at <= 768 px (and only there closes after a page link),
// which at 800 px leaves ~500 px of content on every page once the sidebar was opened. So, at
// <= 900 px: it starts collapsed on each page load and when the window is narrowed past 900 px,
// unless the user chose a state with the toggle (Streamlit keeps that choice in localStorage); and
// a click on a page link in the sidebar closes it again once the new page is shown (as Streamlit
// does on phones), also when the user had opened it with the toggle. Our clicks are not kept as
// a choice: widening the window past 768 px re-opens the sidebar as before.
(() => {
  if (window.__spectrascopeSidebar) return;   // st.html may remount this script; run once per page
  window.__spectrascopeSidebar = true;
  const NARROW = 900;
  const KEY = "stSidebarCollapsed-";          // Streamlit's key prefix for the user's choice
  const stored = () => Object.keys(window.localStorage).filter((k) => k.startsWith(KEY));
  const forget = () => stored().forEach((k) => window.localStorage.removeItem(k));

  // ``always``: also against the user's stored choice (after a page link was followed)
  function collapse(tries, always) {
    if (window.innerWidth > NARROW || (!always && stored().length)) return;
    const sidebar = document.querySelector('section[data-testid="stSidebar"]');
    const button = document.querySelector('[data-testid="stSidebarCollapseButton"] button');
    if (!sidebar || !button) {                 // not drawn yet: try again for up to 10 s
      if (tries > 0) setTimeout(() => collapse(tries - 1, always), 100);
      return;
    }
    if (sidebar.getAttribute("aria-expanded") === "false" || sidebar.dataset.collapsed === "true") return;
    button.click();
    forget();                                  // ours, not the user's choice
  }

  document.addEventListener("click", (event) => {
    const link = event.target.closest && event.target.closest('[data-testid="stSidebarNav"] a');
    if (link && window.innerWidth <= NARROW) {
      forget();                                // opening it to navigate was no lasting choice
      setTimeout(() => collapse(20, true), 150);
    }
  }, true);

  let width = window.innerWidth, timer = null;
  window.addEventListener("resize", () => {    // after Streamlit has applied its own rule
    clearTimeout(timer);
    timer = setTimeout(() => {
      if (width > NARROW && window.innerWidth <= NARROW) collapse(20, false);
      width = window.innerWidth;
    }, 300);
  });
  setTimeout(() => collapse(100, false), 50);
})();
