/* The upload form: lists the chosen files, checks the limits before sending
   (the server enforces them anyway), accepts dropped files. */
(function () {
  "use strict";
  var form = document.getElementById("upload-form");
  var input = document.getElementById("files");
  var drop = document.getElementById("drop");
  var chosen = document.getElementById("chosen");
  var error = document.getElementById("client-error");
  var submit = document.getElementById("submit");
  var maxRequest = parseInt(form.dataset.maxRequest, 10);
  var maxFile = parseInt(form.dataset.maxFile, 10);
  var maxFiles = parseInt(form.dataset.maxFiles, 10);

  function bytes(n) {
    var units = ["B", "KiB", "MiB", "GiB"], i = 0, v = n;
    while (v >= 1024 && i < units.length - 1) { v /= 1024; i++; }
    return (i ? v.toFixed(1) : String(v)) + " " + units[i];
  }

  function problem() {
    var files = input.files, total = 0;
    if (files.length > maxFiles) return "At most " + maxFiles + " files per upload.";
    for (var i = 0; i < files.length; i++) {
      if (files[i].size > maxFile) return files[i].name + " is larger than the limit of " + bytes(maxFile) + ".";
      total += files[i].size;
    }
    if (total > maxRequest) return "The upload is larger than " + bytes(maxRequest) + ".";
    return "";
  }

  function show() {
    while (chosen.firstChild) chosen.removeChild(chosen.firstChild);
    var files = input.files;
    for (var i = 0; i < files.length && i < 200; i++) {
      var li = document.createElement("li");
      var a = document.createElement("span"); a.textContent = files[i].name;
      var b = document.createElement("span"); b.className = "muted"; b.textContent = bytes(files[i].size);
      li.appendChild(a); li.appendChild(b);
      chosen.appendChild(li);
    }
    if (files.length > 200) {
      var more = document.createElement("li");
      more.textContent = "… and " + (files.length - 200) + " more";
      chosen.appendChild(more);
    }
    var p = problem();
    error.textContent = p;
    error.hidden = !p;
  }

  input.addEventListener("change", show);
  ["dragenter", "dragover"].forEach(function (t) {
    drop.addEventListener(t, function (e) { e.preventDefault(); drop.classList.add("over"); });
  });
  ["dragleave", "drop"].forEach(function (t) {
    drop.addEventListener(t, function () { drop.classList.remove("over"); });
  });
  drop.addEventListener("drop", function (e) {
    e.preventDefault();
    if (e.dataTransfer && e.dataTransfer.files.length) { input.files = e.dataTransfer.files; show(); }
  });
  form.addEventListener("submit", function (e) {
    var p = problem();
    if (p) { e.preventDefault(); error.textContent = p; error.hidden = false; return; }
    submit.disabled = true;
    submit.textContent = "Uploading…";
  });
})();
