// Narrow windows (<= 900 px wide) start with the sidebar collapsed. Streamlit's "auto" sidebar
// collapses only at <= 768 px, which leaves ~500 px of content at 800 px. This clicks Streamlit's
// own collapse button once per page load (and when the window is narrowed past 900 px), unless the
// user has chosen a state with the toggle (Streamlit stores that choice in localStorage). Our click
// is not kept as a choice: widening the window past 768 px re-opens the sidebar as before.
(() => {
  if (window.__spectrascopeSidebar) return;   // st.html may remount this script; run once per page
  window.__spectrascopeSidebar = true;
  const NARROW = 900;
  const KEY = "stSidebarCollapsed-";          // Streamlit's key prefix for the user's choice
  const stored = () => Object.keys(window.localStorage).filter((k) => k.startsWith(KEY));

  function collapse(tries) {
    if (window.innerWidth > NARROW || stored().length) return;
    const sidebar = document.querySelector('section[data-testid="stSidebar"]');
    const button = document.querySelector('[data-testid="stSidebarCollapseButton"] button');
    if (!sidebar || !button) {                 // not drawn yet: try again for up to 10 s
      if (tries > 0) setTimeout(() => collapse(tries - 1), 100);
      return;
    }
    if (sidebar.getAttribute("aria-expanded") === "false" || sidebar.dataset.collapsed === "true") return;
    button.click();
    stored().forEach((k) => window.localStorage.removeItem(k));   // ours, not the user's choice
  }

  let width = window.innerWidth, timer = null;
  window.addEventListener("resize", () => {    // after Streamlit has applied its own rule
    clearTimeout(timer);
    timer = setTimeout(() => {
      if (width > NARROW && window.innerWidth <= NARROW) collapse(20);
      width = window.innerWidth;
    }, 300);
  });
  setTimeout(() => collapse(100), 50);
})();
